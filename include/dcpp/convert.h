// Conversions and comparisons between checkpoint formats: DCP directories and torch.save files,
// each named by a path or a URL that OpenStore serves.
//
// A CheckpointSource lists a checkpoint's entries (fully-qualified names with dtype and shape,
// or plain values) and reads one entry at a time, so tools can stream through checkpoints larger
// than memory: a DCP entry is assembled from its chunks on demand.
//
// ConvertDcpToTorch / ConvertTorchToDcp are PyTorch's dcp_to_torch_save / torch_save_to_dcp:
// the nested structure is kept (from DCP's planner_data, or the torch.save tree).
//
// Thread-safety: a CheckpointSource is used by one thread at a time.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dcpp/metadata.h"
#include "dcpp/state_dict.h"
#include "dcpp/status.h"
#include "dcpp/value.h"

namespace dcpp {

enum class CheckpointFormat { kDcp, kTorchSave };
std::string_view FormatName(CheckpointFormat format);  // "dcp", "torch"

// A directory with `.metadata` (or `__0.metadata`) is DCP; a zip file is torch.save.
Result<CheckpointFormat> DetectFormat(const std::string& path);

struct EntryInfo {
  std::string fqn;
  ObjectPath path;
  bool is_tensor = false;
  DType dtype = DType::kFloat32;  // tensors
  Shape shape;                    // tensors
  int64_t nbytes = 0;             // tensors: element bytes; values: stored bytes if known
};

class CheckpointSource {
 public:
  virtual ~CheckpointSource() = default;
  virtual CheckpointFormat format() const = 0;
  virtual const std::vector<EntryInfo>& entries() const = 0;
  // The entry's value: a whole tensor, or the plain value.
  virtual Result<Value> Read(const EntryInfo& entry) = 0;
};

Result<std::unique_ptr<CheckpointSource>> OpenCheckpoint(const std::string& path);

// One torch.save file, named by a path or URL: the whole object tree (tensors, plain values).
// SaveTorchFile writes it atomically (temporary, sync, rename) with the archive name torch.save
// gives a file (its name without the extension).
Result<Value> LoadTorchFile(const std::string& url);
Status SaveTorchFile(const Value& value, const std::string& url);

// Progress callback: (bytes done, bytes total).
using ProgressFn = std::function<void(int64_t, int64_t)>;

Status ConvertDcpToTorch(const std::string& dcp_dir, const std::string& torch_file,
                         const ProgressFn& progress = nullptr);
Status ConvertTorchToDcp(const std::string& torch_file, const std::string& dcp_dir,
                         const ProgressFn& progress = nullptr);

struct DiffOptions {
  double atol = 0;
  double rtol = 0;
};

struct DiffReport {
  std::vector<std::string> differences;  // one line per differing entry
  int64_t compared = 0;
  bool same() const { return differences.empty(); }
};

// Compares two checkpoints (any formats) entry by entry: keys, dtypes, shapes, values (floating
// tensors within atol + rtol * |b|; others exactly).
Result<DiffReport> DiffCheckpoints(const std::string& a, const std::string& b,
                                   const DiffOptions& options = {},
                                   const ProgressFn& progress = nullptr);

}  // namespace dcpp
