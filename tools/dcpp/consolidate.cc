// dcpp consolidate IN OUT [--threads N] [--window-bytes B] [--map FQN=INDEX ...]: DCP's sharded
// safetensors output (shard-*-model-*.safetensors with DCP_SHARDING_INFO, e.g. a sharded/
// directory) into whole-tensor model-*.safetensors files and the index json, streaming.
#include <iostream>

#include "dcpp/hf_storage.h"
#include "tools/dcpp/commands.h"

namespace dcpp::cli {

void RegisterConsolidate(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "consolidate", "Consolidate sharded safetensors (a distributed save) into whole tensors");
  struct Args {
    std::string in, out;
    ConsolidateOptions options;
    std::vector<std::string> map;
    bool quiet = false;
  };
  auto a = std::make_shared<Args>();
  a->options.thread_count = 2;
  cmd->add_option("in", a->in, "directory of shard files")->required();
  cmd->add_option("out", a->out, "output directory")->required();
  cmd->add_option("--threads", a->options.thread_count, "assembling threads");
  cmd->add_option("--window-bytes", a->options.window_bytes, "bytes per assembly window");
  cmd->add_option("--map", a->map, "FQN=INDEX: the output file (1-based) of a tensor");
  cmd->add_flag("--quiet", a->quiet, "print nothing on success");
  cmd->callback([a] {
    for (const auto& m : a->map) {
      const auto eq = m.rfind('=');
      if (eq == std::string::npos) {
        std::cerr << "dcpp consolidate: --map \"" << m << "\" is not FQN=INDEX\n";
        SetExitCode(1);
        return;
      }
      a->options.fqn_to_index_mapping[m.substr(0, eq)] = std::stoi(m.substr(eq + 1));
    }
    auto report = ConsolidateSafetensorsFiles(a->in, a->out, a->options);
    if (!report.ok()) {
      std::cerr << "dcpp consolidate: " << report.status().message() << "\n";
      SetExitCode(1);
      return;
    }
    if (!a->quiet) {
      std::cout << report->tensors << " tensors, " << report->bytes << " bytes in " << report->files
                << " file(s); at most " << report->buffer_bound_bytes
                << " bytes of windows in memory\n";
    }
  });
}

}  // namespace dcpp::cli
