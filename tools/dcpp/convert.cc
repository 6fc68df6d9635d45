// dcpp convert SRC DST --to dcp|torch: DCP <-> torch.save, the source format detected.
#include <iostream>

#include "dcpp/convert.h"
#include "tools/dcpp/commands.h"
#include "tools/dcpp/progress.h"

namespace dcpp::cli {

void RegisterConvert(CLI::App& app) {
  auto* cmd = app.add_subcommand("convert", "Convert between DCP directories and torch.save files");
  struct Args {
    std::string src, dst, to;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("src", a->src, "source checkpoint (DCP directory or torch.save file)")
      ->required();
  cmd->add_option("dst", a->dst, "destination path")->required();
  cmd->add_option("--to", a->to, "target format")
      ->required()
      ->check(CLI::IsMember({"dcp", "torch"}));
  cmd->callback([a] {
    auto from = DetectFormat(a->src);
    if (!from.ok()) {
      std::cerr << "dcpp convert: " << from.status().message() << "\n";
      SetExitCode(1);
      return;
    }
    const bool to_dcp = a->to == "dcp";
    if ((*from == CheckpointFormat::kDcp) == to_dcp) {
      std::cerr << "dcpp convert: \"" << a->src << "\" is already " << FormatName(*from) << "\n";
      SetExitCode(1);
      return;
    }
    ProgressBar bar("converting");
    auto progress = [&bar](int64_t done, int64_t total) { bar.Update(done, total); };
    Status s = to_dcp ? ConvertTorchToDcp(a->src, a->dst, progress)
                      : ConvertDcpToTorch(a->src, a->dst, progress);
    if (!s.ok()) {
      std::cerr << "dcpp convert: " << s.message() << "\n";
      SetExitCode(1);
    }
  });
}

}  // namespace dcpp::cli
