// Registration of the CLI's subcommands; each lives in its own file and registers itself here.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

namespace dcpp::cli {

// Adds every subcommand to `app`.
void RegisterCommands(CLI::App& app);
// Subcommand registration functions (one per file).
void RegisterInspect(CLI::App& app);
void RegisterConvert(CLI::App& app);
void RegisterDiff(CLI::App& app);
void RegisterConsolidate(CLI::App& app);
void RegisterBench(CLI::App& app);
void RegisterVerify(CLI::App& app);

// `dcpp inspect` of a DCP directory; returns the exit code.
int InspectDcp(const std::string& path, bool json);
// `dcpp inspect DIR --svg OUT`: the shard-map picture (inspect_svg.cc); `against` is "" or
// "ranks=N[,dim=D]"; `match` a glob over keys ("" for all).
int InspectSvg(const std::string& path, const std::string& out_path, const std::string& match,
               const std::string& against);
// `dcpp inspect` of a safetensors file or directory; returns the exit code.
int InspectSafetensors(const std::string& path, bool json);

// Process exit code set by the subcommand that ran (0 by default).
int ExitCode();
void SetExitCode(int code);

}  // namespace dcpp::cli
