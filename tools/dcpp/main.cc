// dcpp: inspect, verify and convert checkpoints. Subcommands live in their own files.
#include <CLI/CLI.hpp>
#include <iostream>

#include "tools/dcpp/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"dcpp: distributed checkpoints in PyTorch DCP format"};
  app.require_subcommand(1);
  dcpp::cli::RegisterCommands(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return dcpp::cli::ExitCode();
}
