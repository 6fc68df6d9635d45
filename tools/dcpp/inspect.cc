#include <iostream>

#include "tools/dcpp/commands.h"

namespace dcpp::cli {

void RegisterInspect(CLI::App& app) {
  auto* cmd = app.add_subcommand("inspect", "Show the contents of a checkpoint");
  auto path = std::make_shared<std::string>();
  cmd->add_option("path", *path, "torch.save file or DCP directory")->required();
  cmd->callback([path] {
    std::cerr << "dcpp inspect: not implemented yet\n";
    SetExitCode(2);
  });
}

}  // namespace dcpp::cli
