// dcpp diff A B [--atol X] [--rtol Y]: compares two checkpoints entry by entry; exit 1 on
// difference, 2 on error.
#include <iostream>

#include "dcpp/convert.h"
#include "tools/dcpp/commands.h"
#include "tools/dcpp/progress.h"

namespace dcpp::cli {

void RegisterDiff(CLI::App& app) {
  auto* cmd = app.add_subcommand("diff", "Compare two checkpoints tensor by tensor");
  struct Args {
    std::string a, b;
    DiffOptions options;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("a", args->a, "first checkpoint")->required();
  cmd->add_option("b", args->b, "second checkpoint")->required();
  cmd->add_option("--atol", args->options.atol, "absolute tolerance for floating values");
  cmd->add_option("--rtol", args->options.rtol, "relative tolerance for floating values");
  cmd->callback([args] {
    ProgressBar bar("comparing");
    auto report = DiffCheckpoints(args->a, args->b, args->options,
                                  [&bar](int64_t d, int64_t t) { bar.Update(d, t); });
    if (!report.ok()) {
      std::cerr << "dcpp diff: " << report.status().message() << "\n";
      SetExitCode(2);
      return;
    }
    for (const auto& d : report->differences) std::cout << d << "\n";
    if (report->same()) {
      std::cout << "same: " << report->compared << " entries compared\n";
    } else {
      std::cout << report->differences.size() << " of " << report->compared
                << " compared entries differ (or are missing)\n";
      SetExitCode(1);
    }
  });
}

}  // namespace dcpp::cli
