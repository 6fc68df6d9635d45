// VerifyCheckpoint (include/dcpp/verify.h). Steps:
//   1. Find the metadata files (`.metadata`, else every `__{r}.metadata`), parse and validate
//      each (bounds, chunk overlap; coverage over their union), find each one's manifest.
//   2. Per file referenced, in parallel: every blob in offset order is read once, in pieces of
//      whole manifest segments; each segment's xxHash3 is compared, and each zip record's CRC-32
//      is accumulated from the same bytes. The archive's directory and pickle are parsed first
//      (small reads at the blob's ends), so record boundaries are known before the pass.
//   3. Tensor chunks: the stored dtype and shape must match the metadata and fit their record.
#include "dcpp/verify.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>

#include "codec/stream_transform.h"
#include "codec/torch_save.h"
#include "codec/zip.h"
#include "core/thread_pool.h"
#include "dcpp/layout.h"
#include "dcpp/metadata.h"
#include "dcpp/planner.h"
#include "dcpp/storage.h"
#include "layout/manifest.h"

namespace dcpp {

namespace {

constexpr uint64_t kPieceBytes = 8 << 20;

struct Tally {
  int64_t items = 0, bytes = 0, segments = 0, records = 0;
  std::vector<VerifyProblem> problems;
};

struct BlobRef {
  const MetadataIndex* index;
  const StorageInfo* info;
};

// Whether `info`'s tensor chunk agrees with what its archive holds.
void CheckTensor(const Metadata& md, const MetadataIndex& index, const TorchSaveArchive& archive,
                 const StorageInfo& info, Tally& t) {
  auto problem = [&](std::string msg) {
    t.problems.push_back({index.ToString(), info.relative_path, info.offset, std::move(msg)});
  };
  const StorageMetadata* sm = md.state_dict_metadata.Find(index.fqn);
  if (sm == nullptr) return problem("no entry in the metadata's state dict for this key");
  const auto* tm = std::get_if<TensorStorageMetadata>(sm);
  if (tm == nullptr) {
    auto v = archive.ReadValue(/*opaque_objects=*/true);
    if (!v.ok()) problem(std::string(v.status().message()));
    return;
  }
  auto ref = archive.RootTensor();
  if (!ref.ok()) return problem(std::string(ref.status().message()));
  if (ref->dtype != tm->properties.dtype) {
    return problem("stored " + std::string(DTypeName(ref->dtype)) + " but the metadata says " +
                   std::string(DTypeName(tm->properties.dtype)));
  }
  const ChunkBox* chunk = nullptr;
  for (const auto& c : tm->chunks) {
    if (index.offset && c.offsets == *index.offset) chunk = &c;
  }
  if (chunk && chunk->sizes != ref->shape) {
    return problem("stored shape " + ShapeToString(ref->shape) + " but the chunk is " +
                   ShapeToString(chunk->sizes));
  }
  // The highest element the tensor touches must lie inside its storage record.
  if (ref->numel() > 0) {
    unsigned __int128 last = static_cast<uint64_t>(std::max<int64_t>(ref->storage_offset, 0));
    for (size_t d = 0; d < ref->shape.size(); ++d) {
      last += static_cast<unsigned __int128>(ref->shape[d] - 1) *
              static_cast<uint64_t>(std::max<int64_t>(ref->strides[d], 0));
    }
    if ((last + 1) * ElementSize(ref->dtype) > ref->record_size) {
      problem("tensor of shape " + ShapeToString(ref->shape) + " reaches past its record of " +
              std::to_string(ref->record_size) + " bytes");
    }
  }
}

uint64_t DecodeCap(const Metadata& md, const MetadataIndex& index, uint64_t stored) {
  const StorageMetadata* sm = md.state_dict_metadata.Find(index.fqn);
  const auto* tm = sm ? std::get_if<TensorStorageMetadata>(sm) : nullptr;
  if (tm) {
    auto bytes = CheckedNumBytes(tm->properties.dtype, tm->size);
    if (bytes.ok()) return static_cast<uint64_t>(*bytes) + (uint64_t{1} << 20);
  }
  return std::max<uint64_t>(uint64_t{64} << 20,
                            stored > (~uint64_t{0}) / 1024 ? ~uint64_t{0} : stored * 1024);
}

// Step 2 and 3 for one blob.
void CheckBlob(const ReadableFile& file, const Metadata& md, const MetadataIndex& index,
               const StorageInfo& info, const internal::Manifest* manifest, const std::string& url,
               Tally& t) {
  const std::string key = index.ToString();
  auto problem = [&](int64_t offset, std::string msg) {
    t.problems.push_back({key, info.relative_path, offset, std::move(msg)});
  };
  ++t.items;
  if (info.offset < 0 || info.length < 0 || static_cast<uint64_t>(info.offset) > file.size() ||
      static_cast<uint64_t>(info.length) > file.size() - static_cast<uint64_t>(info.offset)) {
    return problem(info.offset, "byte range [" + std::to_string(info.offset) + ", +" +
                                    std::to_string(info.length) +
                                    ") is past the end of the file (" +
                                    std::to_string(file.size()) + " bytes)");
  }
  const uint64_t base = static_cast<uint64_t>(info.offset);
  const uint64_t length = static_cast<uint64_t>(info.length);
  const internal::ManifestBlob* sums = nullptr;
  if (manifest) {
    sums = manifest->Find(info.relative_path, base, length);
    if (!sums) problem(info.offset, "no checksum in the manifest for these bytes");
  }
  SubSource raw(file, base, length);
  const bool transformed = !info.transform_descriptors.empty();
  std::optional<TorchSaveArchive> archive;
  if (!transformed) {
    auto a = TorchSaveArchive::Open(raw);
    if (a.ok()) {
      archive = *std::move(a);
    } else {
      problem(info.offset, std::string(a.status().message()));
    }
  }
  // Records by data offset, each with its running CRC.
  struct Rec {
    std::string name;
    uint64_t lo, hi;
    uint32_t want, crc = 0;
  };
  std::vector<Rec> recs;
  if (archive) {
    for (const auto& [name, r] : archive->records()) {
      recs.push_back(
          {archive->prefix() + "/" + name, r.data_offset, r.data_offset + r.size, r.crc32});
    }
    std::sort(recs.begin(), recs.end(), [](const Rec& a, const Rec& b) { return a.lo < b.lo; });
  }
  // One pass over the blob's bytes.
  const uint64_t seg = manifest ? manifest->segment_bytes : internal::kManifestSegmentBytes;
  const uint64_t piece = std::max<uint64_t>(seg, kPieceBytes / seg * seg);
  std::string buf(static_cast<size_t>(std::min<uint64_t>(piece, length)), '\0');
  int64_t bad_segments = 0;
  for (uint64_t pos = 0; pos < length || (pos == 0 && length == 0);) {
    const uint64_t n = std::min<uint64_t>(piece, length - pos);
    if (n > 0) {
      Status s = raw.ReadAt(pos, buf.data(), n);
      if (!s.ok())
        return problem(info.offset + static_cast<int64_t>(pos), std::string(s.message()));
    }
    t.bytes += static_cast<int64_t>(n);
    if (sums) {
      const uint64_t* h = manifest->HashesOf(*sums);
      for (uint64_t q = 0; q < n || (length == 0 && q == 0); q += seg) {
        const uint64_t len = std::min<uint64_t>(seg, n - q);
        const uint64_t i = (pos + q) / seg;
        ++t.segments;
        const uint64_t got = internal::Xxh3(buf.data() + q, len);
        if (i < sums->hash_count && got != h[i] && bad_segments++ < 8) {
          problem(info.offset + static_cast<int64_t>(pos + q),
                  "checksum mismatch in bytes [" + std::to_string(base + pos + q) + ", +" +
                      std::to_string(len) + ") (segment " + std::to_string(i) + " of " +
                      std::to_string(sums->hash_count) + ")");
        }
        if (length == 0) break;
      }
    }
    for (Rec& r : recs) {
      const uint64_t a = std::max(r.lo, pos), b = std::min(r.hi, pos + n);
      if (a < b) r.crc = internal::Crc32(r.crc, buf.data() + (a - pos), b - a);
    }
    if (n == 0) break;
    pos += n;
  }
  if (bad_segments > 8) {
    problem(info.offset, std::to_string(bad_segments) + " segments in all do not match");
  }
  for (const Rec& r : recs) {
    ++t.records;
    if (r.crc != r.want) {
      problem(info.offset + static_cast<int64_t>(r.lo),
              "CRC-32 mismatch in record \"" + r.name + "\" (stored " + std::to_string(r.want) +
                  ", computed " + std::to_string(r.crc) + ")");
    }
  }
  std::string decoded;
  std::unique_ptr<MemorySource> decoded_src;
  if (transformed) {
    // Undo the transforms last to first, in memory, then check the archive inside.
    const ByteSource* src = &raw;
    for (auto d = info.transform_descriptors.rbegin(); d != info.transform_descriptors.rend();
         ++d) {
      auto tr = internal::FindStreamTransform(*d);
      auto out = tr.ok() ? (*tr)->Decode(*src, DecodeCap(md, index, length), url)
                         : Result<std::string>(tr.status());
      if (!out.ok()) return problem(info.offset, std::string(out.status().message()));
      decoded = *std::move(out);
      decoded_src = std::make_unique<MemorySource>(decoded, info.relative_path);
      src = decoded_src.get();
    }
    auto a = TorchSaveArchive::Open(*src);
    if (!a.ok()) return problem(info.offset, std::string(a.status().message()));
    archive = *std::move(a);
    for (const auto& [name, r] : archive->records()) {
      ++t.records;
      Status s = internal::VerifyZipCrc(*src, archive->prefix() + "/" + name, r.data_offset, r.size,
                                        r.crc32);
      if (!s.ok()) problem(info.offset, std::string(s.message()) + " (after decoding)");
    }
  }
  if (archive) CheckTensor(md, index, *archive, info, t);
}

void Merge(Tally& into, Tally&& from) {
  into.items += from.items;
  into.bytes += from.bytes;
  into.segments += from.segments;
  into.records += from.records;
  for (auto& p : from.problems) into.problems.push_back(std::move(p));
}

// Step 2 for one metadata file.
void CheckBlobs(Store& store, const Metadata& md, const internal::Manifest* manifest,
                const std::string& url, const VerifyOptions& options, VerifyReport& report) {
  std::map<std::string, std::vector<BlobRef>> files;
  for (const auto& [index, info] : md.storage_data)
    files[info.relative_path].push_back({&index, &info});
  std::vector<const std::pair<const std::string, std::vector<BlobRef>>*> work;
  for (auto& f : files) {
    std::sort(f.second.begin(), f.second.end(),
              [](const BlobRef& a, const BlobRef& b) { return a.info->offset < b.info->offset; });
    work.push_back(&f);
  }
  std::vector<Tally> tallies(work.size());
  internal::ParallelFor(
      work.size(), static_cast<size_t>(std::max(options.thread_count, 1)), [&](size_t w) -> Status {
        const std::string& name = work[w]->first;
        Tally& t = tallies[w];
        auto file = store.OpenRead(name);
        if (!file.ok()) {
          for (const BlobRef& b : work[w]->second) {
            ++t.items;
            t.problems.push_back(
                {b.index->ToString(), name, b.info->offset, std::string(file.status().message())});
          }
          return Status::Ok();
        }
        for (const BlobRef& b : work[w]->second) {
          CheckBlob(**file, md, *b.index, *b.info, manifest, url, t);
        }
        return Status::Ok();
      });
  report.files += static_cast<int64_t>(work.size());
  Tally all;
  for (auto& t : tallies) Merge(all, std::move(t));
  report.items += all.items;
  report.bytes_read += all.bytes;
  report.segments_checked += all.segments;
  report.records_checked += all.records;
  for (auto& p : all.problems) report.problems.push_back(std::move(p));
}

}  // namespace

Result<VerifyReport> VerifyCheckpoint(std::string_view url, const VerifyOptions& options) {
  DCPP_ASSIGN_OR_RETURN(std::unique_ptr<Store> store, OpenStore(url));
  VerifyReport report;
  report.url = std::string(url);
  DCPP_ASSIGN_OR_RETURN(bool collective, store->Exists(kMetadataFileName));
  if (collective) {
    report.metadata_files.push_back(kMetadataFileName);
  } else {
    for (int r = 0;; ++r) {
      const std::string name = "__" + std::to_string(r) + kMetadataFileName;
      DCPP_ASSIGN_OR_RETURN(bool e, store->Exists(name));
      if (!e) break;
      report.metadata_files.push_back(name);
    }
  }
  if (report.metadata_files.empty()) {
    return NotFoundError("no committed checkpoint at \"" + report.url +
                         "\" (.metadata is missing)");
  }
  report.has_manifest = true;
  std::vector<Metadata> parsed;
  for (const std::string& name : report.metadata_files) {
    auto problem = [&](std::string file, std::string msg) {
      report.problems.push_back({"", std::move(file), -1, std::move(msg)});
    };
    auto bytes = store->ReadAll(name);
    if (!bytes.ok()) {
      problem(name, std::string(bytes.status().message()));
      report.has_manifest = false;
      continue;
    }
    report.bytes_read += static_cast<int64_t>(bytes->size());
    auto md = ParseMetadata(*bytes);
    if (!md.ok()) {
      problem(name, std::string(md.status().message()));
      report.has_manifest = false;
      continue;
    }
    Status valid = ValidateMetadata(*md, name);
    if (!valid.ok()) {
      // Out-of-bounds sizes: reading the blobs against them is not meaningful.
      problem(name, std::string(valid.message()));
      continue;
    }
    Status plan = ValidateGlobalPlan(*md, /*require_full_coverage=*/collective);
    if (!plan.ok()) problem(name, std::string(plan.message()));
    // Its manifest, if any.
    const uint64_t hash = internal::Xxh3(bytes->data(), bytes->size());
    const std::string key = internal::ManifestKey(name, hash);
    std::optional<internal::Manifest> manifest;
    auto mbytes = store->ReadAll(key);
    if (mbytes.ok()) {
      report.bytes_read += static_cast<int64_t>(mbytes->size());
      auto m = internal::DecodeManifest(*mbytes, key);
      if (!m.ok()) {
        problem(key, std::string(m.status().message()));
      } else if (m->metadata_hash != hash) {
        problem(key, "the manifest belongs to other metadata than \"" + name + "\"");
      } else {
        manifest = *std::move(m);
        report.manifests.push_back(key);
      }
    } else if (mbytes.status().code() != StatusCode::kNotFound) {
      problem(key, std::string(mbytes.status().message()));
    }
    if (!manifest) report.has_manifest = false;
    CheckBlobs(*store, *md, manifest ? &*manifest : nullptr, report.url, options, report);
    parsed.push_back(*std::move(md));
  }
  if (!collective && parsed.size() == report.metadata_files.size()) {
    // Rank-local files each hold their own chunks; together they must cover every tensor.
    auto merged = MergeRankLocalMetadata(parsed);
    Status s = merged.ok() ? ValidateGlobalPlan(*merged, true) : merged.status();
    if (!s.ok()) report.problems.push_back({"", "", -1, std::string(s.message())});
  }
  return report;
}

std::string VerifyReport::ToString() const {
  std::string out;
  for (const auto& p : problems) {
    out += "BAD ";
    out += p.key.empty() ? std::string("checkpoint") : "\"" + p.key + "\"";
    if (!p.file.empty()) out += " in \"" + p.file + "\"";
    if (p.offset >= 0) out += " at offset " + std::to_string(p.offset);
    out += ": " + p.message + "\n";
  }
  out += url + ": " + std::to_string(items) + " items in " + std::to_string(files) + " files, " +
         std::to_string(bytes_read) + " bytes read; ";
  if (has_manifest) {
    out += "manifest: " + std::to_string(segments_checked) + " segment checksums";
  } else if (manifests.empty()) {
    out += "no manifest (not written by dcpp): checked the structure";
  } else {
    out += "manifest for some metadata files only (" + std::to_string(segments_checked) +
           " segment checksums)";
  }
  out += ", " + std::to_string(records_checked) + " zip CRC-32s; ";
  out += problems.empty() ? "OK" : std::to_string(problems.size()) + " problems";
  return out + "\n";
}

std::string VerifyReport::ToJson() const {
  nlohmann::json j;
  j["url"] = url;
  j["ok"] = ok();
  j["metadata_files"] = metadata_files;
  j["manifests"] = manifests;
  j["has_manifest"] = has_manifest;
  j["items"] = items;
  j["files"] = files;
  j["bytes_read"] = bytes_read;
  j["segments_checked"] = segments_checked;
  j["records_checked"] = records_checked;
  j["problems"] = nlohmann::json::array();
  for (const auto& p : problems) {
    j["problems"].push_back(
        {{"key", p.key}, {"file", p.file}, {"offset", p.offset}, {"message", p.message}});
  }
  return j.dump(2);
}

}  // namespace dcpp
