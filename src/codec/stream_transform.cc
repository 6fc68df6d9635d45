#include "codec/stream_transform.h"

#include <zstd.h>

#include <memory>
#include <mutex>

namespace dcpp::internal {
namespace {

class Zstd final : public StreamTransform {
 public:
  explicit Zstd(int level) : level_(level) {}
  std::string_view descriptor() const override { return kZstdDescriptor; }

  Result<std::string> Encode(std::string_view blob) const override {
    std::string out(ZSTD_compressBound(blob.size()), '\0');
    const size_t n = ZSTD_compress(out.data(), out.size(), blob.data(), blob.size(), level_);
    if (ZSTD_isError(n)) return InternalError(std::string("zstd: ") + ZSTD_getErrorName(n));
    out.resize(n);
    return out;
  }

  Result<std::string> Decode(const ByteSource& src, uint64_t max_output,
                             const std::string& what) const override {
    std::string in(src.size(), '\0');
    DCPP_RETURN_IF_ERROR(src.ReadAt(0, in.data(), in.size()));
    std::unique_ptr<ZSTD_DStream, size_t (*)(ZSTD_DStream*)> ds(ZSTD_createDStream(),
                                                                ZSTD_freeDStream);
    if (!ds) return InternalError(what + ": zstd: out of memory");
    ZSTD_initDStream(ds.get());
    // A frame that declares its size is checked before anything is allocated.
    const unsigned long long declared = ZSTD_getFrameContentSize(in.data(), in.size());
    if (declared != ZSTD_CONTENTSIZE_UNKNOWN && declared != ZSTD_CONTENTSIZE_ERROR &&
        declared > max_output) {
      return DataLossError(what + ": zstd frame declares " + std::to_string(declared) +
                           " bytes, more than the item can hold (" + std::to_string(max_output) +
                           ")");
    }
    std::string out;
    ZSTD_inBuffer ib{in.data(), in.size(), 0};
    std::string chunk(ZSTD_DStreamOutSize(), '\0');
    size_t ret = 1;
    while (ib.pos < ib.size) {
      ZSTD_outBuffer ob{chunk.data(), chunk.size(), 0};
      ret = ZSTD_decompressStream(ds.get(), &ob, &ib);
      if (ZSTD_isError(ret)) return DataLossError(what + ": zstd: " + ZSTD_getErrorName(ret));
      if (out.size() + ob.pos > max_output) {
        return DataLossError(what + ": zstd stream expands past " + std::to_string(max_output) +
                             " bytes, more than the item can hold");
      }
      out.append(chunk.data(), ob.pos);
      if (ob.pos == 0 && ret == 0) break;
    }
    if (ret != 0) return DataLossError(what + ": truncated zstd stream");
    return out;
  }

 private:
  int level_;
};

}  // namespace

const StreamTransform& ZstdTransform(int level) {
  static const Zstd* transforms[20] = {};
  static std::once_flag once;
  std::call_once(once, [] {
    for (int l = 0; l < 20; ++l) transforms[l] = new Zstd(l == 0 ? 3 : l);
  });
  return *transforms[level < 0 || level > 19 ? 0 : level];
}

Result<const StreamTransform*> FindStreamTransform(std::string_view descriptor) {
  // PyTorch writes "stream.zstd/1"; accept later minor forms of the same prefix.
  if (descriptor.starts_with(kZstdDescriptor)) return &ZstdTransform(0);
  return UnimplementedError("stream transform \"" + std::string(descriptor) +
                            "\" is not supported");
}

}  // namespace dcpp::internal
