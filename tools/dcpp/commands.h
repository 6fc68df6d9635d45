// Registration of the CLI's subcommands; each lives in its own file and registers itself here.
#pragma once

#include <CLI/CLI.hpp>

namespace dcpp::cli {

// Adds every subcommand to `app`.
void RegisterCommands(CLI::App& app);
// Subcommand registration functions (one per file).
void RegisterInspect(CLI::App& app);

// Process exit code set by the subcommand that ran (0 by default).
int ExitCode();
void SetExitCode(int code);

}  // namespace dcpp::cli
