// dcpp convert SRC DST --to dcp|torch|safetensors [--max-shard-size 5GB]: between DCP
// directories, torch.save files and safetensors (a file or a Hugging Face directory), the source
// format detected.
#include <cctype>
#include <iostream>
#include <vector>

#include "dcpp/convert.h"
#include "tools/dcpp/commands.h"
#include "tools/dcpp/progress.h"

namespace dcpp::cli {
namespace {

// "5GB" (powers of 1000, as Hugging Face), "512MiB" (powers of 1024), or plain bytes.
bool ParseSize(const std::string& text, uint64_t* out) {
  size_t i = 0;
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) ++i;
  if (i == 0) return false;
  const uint64_t n = std::stoull(text.substr(0, i));
  std::string unit = text.substr(i);
  for (auto& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  static const std::vector<std::pair<std::string, uint64_t>> kUnits = {{"", 1},
                                                                       {"B", 1},
                                                                       {"KB", 1000},
                                                                       {"MB", 1000 * 1000},
                                                                       {"GB", 1000000000},
                                                                       {"TB", 1000000000000},
                                                                       {"KIB", 1 << 10},
                                                                       {"MIB", 1 << 20},
                                                                       {"GIB", 1 << 30},
                                                                       {"TIB", uint64_t{1} << 40}};
  for (const auto& [name, mult] : kUnits) {
    if (unit == name) {
      *out = n * mult;
      return true;
    }
  }
  return false;
}

}  // namespace

void RegisterConvert(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "convert", "Convert between DCP directories, torch.save files and safetensors");
  struct Args {
    std::string src, dst, to, max_shard_size = "5GB";
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("src", a->src,
                  "source checkpoint (DCP directory, torch.save file, safetensors file or "
                  "directory)")
      ->required();
  cmd->add_option("dst", a->dst, "destination path")->required();
  cmd->add_option("--to", a->to, "target format")
      ->required()
      ->check(CLI::IsMember({"dcp", "torch", "safetensors"}));
  cmd->add_option("--max-shard-size", a->max_shard_size,
                  "largest safetensors file (e.g. 5GB, 500MiB; a bigger tensor gets its own)");
  cmd->callback([a] {
    auto fail = [](const std::string& msg) {
      std::cerr << "dcpp convert: " << msg << "\n";
      SetExitCode(1);
    };
    auto from = DetectFormat(a->src);
    if (!from.ok()) return fail(std::string(from.status().message()));
    if (FormatName(*from) == a->to) {
      return fail("\"" + a->src + "\" is already " + std::string(FormatName(*from)));
    }
    ProgressBar bar("converting");
    auto progress = [&bar](int64_t done, int64_t total) { bar.Update(done, total); };
    Status s;
    if (a->to == "safetensors") {
      SafetensorsConvertOptions options;
      if (!ParseSize(a->max_shard_size, &options.max_shard_size) || options.max_shard_size == 0) {
        return fail("--max-shard-size \"" + a->max_shard_size + "\" is not a size");
      }
      std::vector<std::string> skipped;
      options.skipped = &skipped;
      s = ConvertToSafetensors(a->src, a->dst, options, progress);
      if (s.ok() && !skipped.empty()) {
        std::cerr << "dcpp convert: " << skipped.size()
                  << " non-tensor entries skipped (safetensors holds tensors only):";
        for (const auto& k : skipped) std::cerr << " " << k;
        std::cerr << "\n";
      }
    } else if (*from == CheckpointFormat::kSafetensors) {
      s = a->to == "dcp" ? ConvertSafetensorsToDcp(a->src, a->dst, progress)
                         : ConvertSafetensorsToTorch(a->src, a->dst, progress);
    } else {
      s = a->to == "dcp" ? ConvertTorchToDcp(a->src, a->dst, progress)
                         : ConvertDcpToTorch(a->src, a->dst, progress);
    }
    if (!s.ok()) fail(std::string(s.message()));
  });
}

}  // namespace dcpp::cli
