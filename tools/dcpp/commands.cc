#include "tools/dcpp/commands.h"

namespace dcpp::cli {
namespace {
int g_exit_code = 0;
}  // namespace

void RegisterCommands(CLI::App& app) {
  RegisterInspect(app);
  RegisterConvert(app);
  RegisterDiff(app);
  RegisterConsolidate(app);
  RegisterBench(app);
  RegisterVerify(app);
}
int ExitCode() { return g_exit_code; }
void SetExitCode(int code) { g_exit_code = code; }

}  // namespace dcpp::cli
