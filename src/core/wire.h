// Compact little-endian encodings for messages between ranks (plans, write results, statuses).
//
// WireWriter appends u64 / string / shape / status fields; WireReader reads them back with every
// length checked against the remaining bytes, returning DataLoss (naming `what`) on malformed
// input. Not a storage format: both ends are the same build of dcpp.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "dcpp/status.h"
#include "dcpp/tensor.h"

namespace dcpp::internal {

class WireWriter {
 public:
  void U64(uint64_t v) {
    char b[8];
    for (int i = 0; i < 8; ++i) b[i] = static_cast<char>(v >> (8 * i));
    out_.append(b, 8);
  }
  void Str(std::string_view s) {
    U64(s.size());
    out_.append(s);
  }
  void Dims(const Shape& s) {
    U64(s.size());
    for (int64_t x : s) U64(static_cast<uint64_t>(x));
  }
  // The code and, when not OK, the message.
  void Status(const dcpp::Status& s) {
    U64(static_cast<uint64_t>(s.code()));
    if (!s.ok()) Str(s.message());
  }
  void Raw(std::string_view bytes) { out_.append(bytes); }
  std::string Release() { return std::move(out_); }

 private:
  std::string out_;
};

class WireReader {
 public:
  WireReader(std::string_view bytes, std::string what) : b_(bytes), what_(std::move(what)) {}

  Result<uint64_t> U64() {
    if (b_.size() - pos_ < 8) return Malformed();
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i)
      v |= static_cast<uint64_t>(static_cast<uint8_t>(b_[pos_ + i])) << (8 * i);
    pos_ += 8;
    return v;
  }
  Result<std::string> Str() {
    DCPP_ASSIGN_OR_RETURN(uint64_t n, U64());
    if (b_.size() - pos_ < n) return Malformed();
    std::string s(b_.substr(pos_, n));
    pos_ += n;
    return s;
  }
  Result<Shape> Dims() {
    DCPP_ASSIGN_OR_RETURN(uint64_t n, U64());
    if (n > 64) return Malformed();
    Shape s(n);
    for (auto& x : s) {
      DCPP_ASSIGN_OR_RETURN(uint64_t v, U64());
      x = static_cast<int64_t>(v);
    }
    return s;
  }
  // Reads a status written by WireWriter::Status into *carried; the return value is the
  // decoding error, if any (a Result<Status> would be ambiguous).
  dcpp::Status ReadStatus(dcpp::Status* carried) {
    DCPP_ASSIGN_OR_RETURN(uint64_t code, U64());
    if (code == 0) {
      *carried = dcpp::Status();
      return dcpp::Status();
    }
    if (code > 255) return Malformed();
    DCPP_ASSIGN_OR_RETURN(std::string msg, Str());
    *carried = dcpp::Status(static_cast<StatusCode>(code), std::move(msg));
    return dcpp::Status();
  }
  // A count of elements that each take at least one byte: bounded by what is left.
  Result<uint64_t> Count() {
    DCPP_ASSIGN_OR_RETURN(uint64_t n, U64());
    if (n > b_.size() - pos_) return Malformed();
    return n;
  }
  std::string_view Rest() {
    std::string_view r = b_.substr(pos_);
    pos_ = b_.size();
    return r;
  }
  bool done() const { return pos_ == b_.size(); }
  dcpp::Status Malformed() const { return DataLossError(what_ + ": malformed encoding"); }

 private:
  std::string_view b_;
  std::string what_;
  size_t pos_ = 0;
};

}  // namespace dcpp::internal
