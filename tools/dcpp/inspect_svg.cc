// `dcpp inspect DIR --svg OUT [--match GLOB] [--against ranks=N,dim=D]`: a picture of where a
// DCP checkpoint's tensors live. Each tensor is drawn as its global box (dims 0 and 1; a 1-d
// tensor is a strip, a 0-d one a cell) split into the stored chunks, each chunk coloured by the
// rank that wrote it (from the file name `__{rank}_{n}.distcp`; any other file name is its own
// colour) and labelled with the file and its size. With --against, the boxes a loader of N ranks
// sharded evenly along dim D asks for are drawn over the stored chunks, and each reader's reads are
// listed: how many stored chunks it touches and how many bytes it reads from which rank's files,
// which is what explains a resharding load's I/O. Tensors of 3 or more dims are drawn by their
// first two dims (chunks split along later dims overlap in the picture; the panel says so).
#include <fnmatch.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "dcpp/chunk.h"
#include "dcpp/layout.h"
#include "dcpp/metadata.h"
#include "tools/dcpp/commands.h"

namespace dcpp::cli {
namespace {

// Colours of files (colour-blind-safe first, then more), cycled when there are more files.
constexpr const char* kPalette[] = {"#4e79a7", "#f28e2b", "#59a14f", "#e15759",
                                    "#b07aa1", "#76b7b2", "#edc948", "#ff9da7",
                                    "#9c755f", "#86bcb6", "#d37295", "#a0cbe8"};
constexpr int kPaletteSize = sizeof(kPalette) / sizeof(kPalette[0]);
constexpr double kBoxWidth = 520, kLeft = 24, kPanelGap = 28, kLine = 17;

std::string Escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

std::string HumanBytes(double n) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (n >= 1024 && u < 4) n /= 1024, ++u;
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", n, units[u]);
  return buf;
}

std::string Num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}

// (rank, "") for a DCP data file `__{rank}_{n}.distcp`, (INT64_MAX, name) for any other name.
std::pair<int64_t, std::string> WriterKey(const std::string& name) {
  if (name.size() > 2 && name.compare(0, 2, "__") == 0) {
    size_t i = 2;
    int64_t rank = 0;
    while (i < name.size() && i < 12 && name[i] >= '0' && name[i] <= '9') {
      rank = rank * 10 + (name[i] - '0');
      ++i;
    }
    if (i > 2 && i < name.size() && name[i] == '_') return {rank, ""};
  }
  return {INT64_MAX, name};
}

struct ReaderSpec {
  int ranks = 0;  // 0: no overlay
  int dim = 0;
};

// "ranks=3,dim=1" (either order; dim defaults to 0).
std::optional<ReaderSpec> ParseSpec(const std::string& s) {
  ReaderSpec spec;
  std::stringstream in(s);
  std::string part;
  while (std::getline(in, part, ',')) {
    auto eq = part.find('=');
    if (eq == std::string::npos) return std::nullopt;
    const std::string k = part.substr(0, eq), v = part.substr(eq + 1);
    char* end = nullptr;
    const long n = std::strtol(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0' || n < 0 || n > 1 << 20) return std::nullopt;
    if (k == "ranks") {
      spec.ranks = static_cast<int>(n);
    } else if (k == "dim") {
      spec.dim = static_cast<int>(n);
    } else {
      return std::nullopt;
    }
  }
  if (spec.ranks < 1) return std::nullopt;
  return spec;
}

// The box reader `r` of `spec.ranks` wants: an even split along spec.dim, or the whole tensor
// when the tensor has no such dim (every reader loads it whole).
ChunkBox ReaderBox(const Shape& shape, const ReaderSpec& spec, int r) {
  ChunkBox b = WholeBox(shape);
  if (spec.dim < static_cast<int>(shape.size())) {
    const int64_t n = shape[spec.dim];
    const int64_t lo = n * r / spec.ranks, hi = n * (r + 1) / spec.ranks;
    b.offsets[spec.dim] = lo;
    b.sizes[spec.dim] = hi - lo;
  }
  return b;
}

// Maps a box in the tensor's index space to the panel's pixels.
struct Frame {
  double x, y, w, h;
  int64_t rows, cols;
  int dims;
  void Place(const ChunkBox& b, double& bx, double& by, double& bw, double& bh) const {
    int64_t r0 = 0, rs = 1, c0 = 0, cs = 1;
    if (dims == 1) {
      c0 = b.offsets[0], cs = b.sizes[0];
    } else if (dims >= 2) {
      r0 = b.offsets[0], rs = b.sizes[0], c0 = b.offsets[1], cs = b.sizes[1];
    }
    bx = x + w * static_cast<double>(c0) / static_cast<double>(cols);
    bw = w * static_cast<double>(cs) / static_cast<double>(cols);
    by = y + h * static_cast<double>(r0) / static_cast<double>(rows);
    bh = h * static_cast<double>(rs) / static_cast<double>(rows);
  }
};

}  // namespace

int InspectSvg(const std::string& path, const std::string& out_path, const std::string& match,
               const std::string& against) {
  std::optional<ReaderSpec> spec;
  if (!against.empty()) {
    spec = ParseSpec(against);
    if (!spec) {
      std::cerr << "dcpp inspect: --against \"" << against
                << "\": expected ranks=N[,dim=D] with N >= 1\n";
      return 2;
    }
  }
  auto reader = FileSystemReader::Open(path);
  Result<Metadata> md = reader.ok() ? (*reader)->ReadMetadata() : Result<Metadata>(reader.status());
  if (!md.ok()) {
    std::cerr << "dcpp inspect: " << md.status().message() << "\n";
    return 1;
  }
  // Chunks are coloured by writer: the rank of a DCP file name `__{rank}_{n}.distcp` (a rank with
  // several writer threads has several files), or the file itself for other names.
  std::map<std::string, int64_t> file_bytes;
  for (const auto& [index, info] : md->storage_data) file_bytes[info.relative_path] += info.length;
  struct Writer {
    std::vector<std::string> files;
    int64_t bytes = 0;
  };
  std::map<std::pair<int64_t, std::string>, Writer> writers;  // (rank, "") or (max, file)
  std::map<std::string, std::string> writer_of;               // file -> writer label
  std::map<std::string, int> colour;                          // file -> palette index
  for (const auto& [name, bytes] : file_bytes) {
    const auto key = WriterKey(name);
    writers[key].files.push_back(name);
    writers[key].bytes += bytes;
  }
  int ranks = 0, next_colour = 0;
  for (const auto& [key, w] : writers) {
    const bool is_rank = key.second.empty();
    ranks += is_rank;
    for (const auto& f : w.files) {
      writer_of[f] = is_rank ? "rank " + std::to_string(key.first) : f;
      colour[f] = next_colour % kPaletteSize;
    }
    ++next_colour;
  }

  std::ostringstream body;
  double y = 24;
  body << "<text x='" << kLeft << "' y='" << y << "' class='h1'>" << Escape(path) << "</text>\n";
  y += 22;
  body << "<text x='" << kLeft << "' y='" << y << "' class='t'>" << md->state_dict_metadata.size()
       << " keys in " << file_bytes.size() << " files"
       << (ranks ? " written by " + std::to_string(ranks) + " ranks" : std::string())
       << ". Chunks are coloured by the rank (file) that wrote them"
       << (spec ? "; dashed boxes: what each reader rank asks for" : "") << ".</text>\n";
  y += 14;
  // Legend: one entry per writer, with its files and bytes.
  double lx = kLeft;
  for (const auto& [key, w] : writers) {
    std::string label = writer_of[w.files[0]];
    if (key.second.empty()) {
      label += w.files.size() == 1 ? " (" + w.files[0] + ")"
                                   : " (" + std::to_string(w.files.size()) + " files)";
    }
    label += "  " + HumanBytes(static_cast<double>(w.bytes));
    const double width = 30 + 7.0 * static_cast<double>(label.size());
    if (lx + width > kLeft + 900) lx = kLeft, y += 20;
    body << "<rect x='" << Num(lx) << "' y='" << Num(y) << "' width='14' height='14' fill='"
         << kPalette[colour[w.files[0]]] << "'/><text x='" << Num(lx + 19) << "' y='" << Num(y + 12)
         << "' class='t'>" << Escape(label) << "</text>\n";
    lx += width;
  }
  y += 20 + kPanelGap / 2;

  int drawn = 0, skipped_bytes = 0, not_matched = 0;
  for (const auto& [fqn, m] : md->state_dict_metadata) {
    const auto* t = std::get_if<TensorStorageMetadata>(&m);
    if (t == nullptr) {
      ++skipped_bytes;
      continue;
    }
    if (!match.empty() && fnmatch(match.c_str(), fqn.c_str(), 0) != 0) {
      ++not_matched;
      continue;
    }
    ++drawn;
    const Shape& shape = t->size;
    const int dims = static_cast<int>(shape.size());
    const size_t esize = ElementSize(t->properties.dtype);
    const int64_t nbytes = NumElements(shape) * static_cast<int64_t>(esize);
    body << "<text x='" << kLeft << "' y='" << Num(y) << "' class='h2'>" << Escape(fqn)
         << "<tspan dx='10' class='t'>" << DTypeName(t->properties.dtype) << ShapeToString(shape)
         << ", " << HumanBytes(static_cast<double>(nbytes)) << ", " << t->chunks.size() << " chunk"
         << (t->chunks.size() == 1 ? "" : "s") << "</tspan></text>\n";
    y += 10;
    Frame f;
    f.dims = dims;
    f.rows = dims >= 2 ? std::max<int64_t>(shape[0], 1) : 1;
    f.cols = dims >= 2   ? std::max<int64_t>(shape[1], 1)
             : dims == 1 ? std::max<int64_t>(shape[0], 1)
                         : 1;
    f.x = kLeft;
    f.y = y;
    f.w = dims == 0 ? 60 : kBoxWidth;
    f.h = dims >= 2
              ? std::clamp(kBoxWidth * static_cast<double>(f.rows) / static_cast<double>(f.cols),
                           36.0, 300.0)
              : 36.0;
    body << "<rect x='" << Num(f.x) << "' y='" << Num(f.y) << "' width='" << Num(f.w)
         << "' height='" << Num(f.h) << "' class='box'/>\n";
    bool deep_split = false;
    for (const auto& c : t->chunks) {
      for (int d = 2; d < dims; ++d) deep_split |= c.sizes[d] != shape[d];
      auto info = md->FindStorage({fqn, c.offsets, std::nullopt});
      const std::string file = info.ok() ? (*info)->relative_path : "?";
      const int64_t len = info.ok() ? (*info)->length : 0;
      double bx, by, bw, bh;
      f.Place({c.offsets, c.sizes}, bx, by, bw, bh);
      const char* fill = colour.count(file) ? kPalette[colour[file]] : "#bbbbbb";
      body << "<rect x='" << Num(bx) << "' y='" << Num(by) << "' width='" << Num(bw) << "' height='"
           << Num(bh) << "' fill='" << fill << "' class='chunk'><title>" << Escape(fqn)
           << " offsets " << ShapeToString(c.offsets) << " sizes " << ShapeToString(c.sizes) << ": "
           << Escape(file) << " +" << len << " bytes</title></rect>\n";
      const std::string label = file + " " + HumanBytes(static_cast<double>(len));
      if (bw > 7.0 * static_cast<double>(label.size()) + 8 && bh >= 18) {
        body << "<text x='" << Num(bx + 5) << "' y='" << Num(by + 14) << "' class='in'>"
             << Escape(label) << "</text>\n";
      } else if (bw > 48 && bh >= 18) {
        body << "<text x='" << Num(bx + 4) << "' y='" << Num(by + 14) << "' class='in'>"
             << HumanBytes(static_cast<double>(len)) << "</text>\n";
      }
    }
    // Axis labels: the extent of each drawn dim.
    if (dims >= 1) {
      body << "<text x='" << Num(f.x + f.w + 6) << "' y='" << Num(f.y + 12) << "' class='t'>"
           << (dims >= 2 ? "dim 1: " + std::to_string(shape[1]) + " →"
                         : "dim 0: " + std::to_string(shape[0]) + " →")
           << "</text>\n";
    }
    if (dims >= 2) {
      body << "<text x='" << Num(f.x + f.w + 6) << "' y='" << Num(f.y + 28)
           << "' class='t'>dim 0: " << shape[0] << " ↓</text>\n";
    }
    double below = f.y + f.h + 4;
    if (deep_split) {
      below += kLine;
      body << "<text x='" << kLeft << "' y='" << Num(below) << "' class='t'>chunks also split dims "
           << "≥ 2: drawn by dims 0 and 1, they overlap here</text>\n";
    }
    if (spec) {
      for (int r = 0; r < spec->ranks; ++r) {
        const ChunkBox want = ReaderBox(shape, *spec, r);
        if (want.numel() == 0) continue;
        const bool whole = want == WholeBox(shape);
        if (!whole || r == 0) {
          double bx, by, bw, bh;
          f.Place(want, bx, by, bw, bh);
          body << "<rect x='" << Num(bx + 1.5) << "' y='" << Num(by + 1.5) << "' width='"
               << Num(std::max(bw - 3, 1.0)) << "' height='" << Num(std::max(bh - 3, 1.0))
               << "' class='want'/>\n<text x='" << Num(bx + 5) << "' y='" << Num(by + bh - 6)
               << "' class='wl'>" << (whole ? "every reader" : "reader " + std::to_string(r))
               << "</text>\n";
        }
        // What this reader reads: the overlap with every stored chunk, summed per writer.
        std::map<std::string, int64_t> from;
        int reads = 0;
        int64_t total = 0;
        for (const auto& c : t->chunks) {
          auto o = Intersect(want, {c.offsets, c.sizes});
          if (!o || o->numel() == 0) continue;
          ++reads;
          auto info = md->FindStorage({fqn, c.offsets, std::nullopt});
          const std::string file = info.ok() ? (*info)->relative_path : "?";
          const int64_t bytes = o->numel() * static_cast<int64_t>(esize);
          from[writer_of.count(file) ? writer_of[file] : file] += bytes;
          total += bytes;
        }
        below += kLine;
        std::string line = "reader " + std::to_string(r) + " wants " + want.ToString() + ": " +
                           std::to_string(reads) + " read" + (reads == 1 ? "" : "s") + ", " +
                           HumanBytes(static_cast<double>(total)) + " from ";
        // At most 4 writers a line, so wide jobs stay inside the picture.
        int on_line = 0;
        for (const auto& [writer, bytes] : from) {
          if (on_line == 4) {
            body << "<text x='" << kLeft << "' y='" << Num(below) << "' class='t'>" << Escape(line)
                 << ",</text>\n";
            below += kLine;
            line = "    ";
            on_line = 0;
          }
          line += std::string(on_line ? ", " : "") + writer + " " +
                  HumanBytes(static_cast<double>(bytes));
          ++on_line;
        }
        body << "<text x='" << kLeft << "' y='" << Num(below) << "' class='t'>" << Escape(line)
             << "</text>\n";
      }
    }
    y = below + kPanelGap;
  }
  if (skipped_bytes || not_matched) {
    body << "<text x='" << kLeft << "' y='" << Num(y) << "' class='t'>not drawn: " << skipped_bytes
         << " non-tensor item(s)";
    if (not_matched)
      body << ", " << not_matched << " tensor(s) not matching \"" << Escape(match) << "\"";
    body << "</text>\n";
    y += kLine;
  }
  std::ofstream out(out_path, std::ios::binary | std::ios::trunc);
  out << "<?xml version='1.0' encoding='UTF-8'?>\n"
      << "<svg xmlns='http://www.w3.org/2000/svg' width='960' height='" << Num(y + 10)
      << "' viewBox='0 0 960 " << Num(y + 10) << "' font-family='DejaVu Sans, Arial, sans-serif'>\n"
      << "<style>.h1{font-size:16px;font-weight:bold}.h2{font-size:14px;font-weight:bold}"
      << ".t{font-size:12px;font-weight:normal;fill:#333}.in{font-size:11px;fill:#fff}"
      << ".box{fill:#f4f4f4;stroke:#555;stroke-width:1}.chunk{stroke:#fff;stroke-width:1.5}"
      << ".want{fill:none;stroke:#111;stroke-width:2.5;stroke-dasharray:7 4}"
      << ".wl{font-size:11px;font-weight:bold;fill:#111}</style>\n"
      << "<rect width='100%' height='100%' fill='#fff'/>\n"
      << body.str() << "</svg>\n";
  out.close();
  if (!out) {
    std::cerr << "dcpp inspect: cannot write " << out_path << "\n";
    return 1;
  }
  std::cout << "wrote " << out_path << ": " << drawn << " tensor(s) drawn\n";
  return 0;
}

}  // namespace dcpp::cli
