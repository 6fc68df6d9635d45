// dcpp gc PATH [--dry-run]: removes the leftovers of failed or killed saves from a checkpoint
// directory (CollectGarbage) under the directory's save lock; prints each file removed.
#include <iostream>

#include "dcpp/layout.h"
#include "tools/dcpp/commands.h"

namespace dcpp::cli {

void RegisterGc(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "gc", "Remove files of failed or killed saves that no committed checkpoint uses");
  struct Args {
    std::string path;
    bool dry_run = false;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("path", args->path, "checkpoint directory")->required();
  cmd->add_flag("--dry-run,-n", args->dry_run, "list what would be removed, remove nothing");
  cmd->callback([args] {
    auto removed = CollectGarbage(args->path, args->dry_run);
    if (!removed.ok()) {
      std::cerr << "dcpp gc: " << removed.status().message() << "\n";
      SetExitCode(1);
      return;
    }
    const char* verb = args->dry_run ? "would remove " : "removed ";
    for (const auto& f : *removed) std::cout << verb << f << "\n";
    std::cout << (args->dry_run ? "would remove " : "removed ") << removed->size() << " file"
              << (removed->size() == 1 ? "" : "s") << "\n";
  });
}

}  // namespace dcpp::cli
