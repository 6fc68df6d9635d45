// dcpp verify PATH [--json] [--threads N]: reads every byte of a checkpoint and checks it (the
// manifest's checksums, zip CRCs, structure). Exit 0 when sound, 1 when anything is damaged (each
// bad item named by key, file and offset), 2 when it cannot be checked at all.
#include <iostream>

#include "dcpp/verify.h"
#include "tools/dcpp/commands.h"

namespace dcpp::cli {

void RegisterVerify(CLI::App& app) {
  auto* cmd = app.add_subcommand("verify", "Read every byte of a checkpoint and check it");
  struct Args {
    std::string path;
    bool json = false;
    VerifyOptions options;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("path", args->path, "checkpoint directory or URL (s3://...)")->required();
  cmd->add_flag("--json", args->json, "print the report as JSON");
  cmd->add_option("--threads", args->options.thread_count, "files read in parallel");
  cmd->callback([args] {
    auto report = VerifyCheckpoint(args->path, args->options);
    if (!report.ok()) {
      std::cerr << "dcpp verify: " << report.status().message() << "\n";
      SetExitCode(2);
      return;
    }
    std::cout << (args->json ? report->ToJson() + "\n" : report->ToString());
    if (!report->ok()) SetExitCode(1);
  });
}

}  // namespace dcpp::cli
