// S3Store: a Store over an S3 bucket, with libcurl (which signs requests itself, SigV4).
//
// How the Store calls map onto S3 requests:
//   1. OpenWrite checks that no object is a "parent directory" of the key and that no object
//      lives under key + "/" (the file system's file/directory rules); the writer then buffers
//      appends into parts. A file of at most one part is one PUT at Close; a larger one starts a
//      multipart upload and sends its parts in batches of four, in parallel on dcpp's thread pool
//      (core/thread_pool.h), so a file buffers at most four parts; Close sends the rest and
//      completes the upload. Until then no object exists; a writer destroyed unclosed aborts its
//      upload.
//   2. WriteAtomic is that same upload: S3 makes each object appear whole, so `.metadata` needs
//      no temporary and no rename.
//   3. OpenRead GETs the first open_prefetch bytes, which also gives the size and the ETag; a
//      small object is then served from memory. Larger reads are ranged GETs with If-Match on the
//      ETag (a replaced object fails instead of mixing versions), split into read_part_size
//      pieces fetched in parallel (the same thread pool) straight into the caller's buffer. Small
//      reads (record headers) fetch the aligned small_read_block around them into a little
//      per-reader cache.
//   4. Every request is retried on transport errors, 5xx, 429 and RequestTimeout, with
//      exponential backoff and jitter; when retries run out the error is Unavailable.
#include "dcpp/s3_store.h"

#include <cstdlib>
#include <string>

namespace dcpp {
namespace {

std::string Env(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

}  // namespace

S3Options S3OptionsFromEnv() {
  S3Options o;
  o.access_key_id = Env("AWS_ACCESS_KEY_ID");
  o.secret_access_key = Env("AWS_SECRET_ACCESS_KEY");
  o.session_token = Env("AWS_SESSION_TOKEN");
  if (std::string r = Env("AWS_REGION"); !r.empty()) {
    o.region = r;
  } else if (std::string d = Env("AWS_DEFAULT_REGION"); !d.empty()) {
    o.region = d;
  }
  if (std::string e = Env("AWS_ENDPOINT_URL_S3"); !e.empty()) {
    o.endpoint = e;
  } else if (std::string g = Env("AWS_ENDPOINT_URL"); !g.empty()) {
    o.endpoint = g;
  }
  return o;
}

StoreFactory S3StoreFactory(S3Options options) {
  return [options = std::move(options)](std::string_view url, const StoreOpenOptions& open) {
    return OpenS3Store(url, options, open);
  };
}

}  // namespace dcpp

#ifndef DCPP_HAVE_S3

namespace dcpp {
bool S3StoreAvailable() { return false; }
Result<std::unique_ptr<Store>> OpenS3Store(std::string_view url, const S3Options&,
                                           const StoreOpenOptions&) {
  return UnimplementedError("\"" + std::string(url) +
                            "\": this build of dcpp has no S3 store (libcurl was not found)");
}
}  // namespace dcpp

#else  // DCPP_HAVE_S3

#include <curl/curl.h>
#include <pugixml.hpp>

#include "core/thread_pool.h"

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

namespace dcpp {
namespace {

// ------------------------------------------------------------------ helpers

// RFC 3986 percent-encoding as SigV4 canonicalizes it: only unreserved bytes stay literal.
std::string UriEncode(std::string_view s, bool keep_slash) {
  static const char* kHex = "0123456789ABCDEF";
  std::string out;
  out.reserve(s.size());
  for (unsigned char c : s) {
    if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
        c == '_' || c == '.' || c == '~' || (keep_slash && c == '/')) {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

// A query string in SigV4's canonical form (sorted by name, every name and value encoded), so
// the URL libcurl signs is already canonical.
std::string Query(std::vector<std::pair<std::string, std::string>> params) {
  std::sort(params.begin(), params.end());
  std::string q;
  for (const auto& [k, v] : params) {
    if (!q.empty()) q += '&';
    q += UriEncode(k, false) + "=" + UriEncode(v, false);
  }
  return q;
}

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// Bucket names: 3-63 of [a-z0-9.-] (S3's rules); checked so a URL cannot smuggle a path.
bool ValidBucket(std::string_view b) {
  if (b.size() < 3 || b.size() > 63) return false;
  for (char c : b) {
    if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-')) return false;
  }
  return true;
}

void InitCurlOnce() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

// ------------------------------------------------------------------ HTTP

struct Request {
  std::string method = "GET";
  std::string object;  // key in the bucket; "" for the bucket itself
  std::string query;   // canonical (Query()), without '?'
  std::vector<std::string> headers;
  std::string_view body;  // PUT/POST payload
  // A GET's body goes here when set (exactly `capacity` bytes expected), else into Response::body.
  char* dst = nullptr;
  size_t capacity = 0;
};

struct Response {
  long code = 0;
  std::string body;
  std::map<std::string, std::string> headers;  // lower-case names
  size_t received = 0;                         // bytes written to Request::dst
  bool overflow = false;                       // the server sent more than capacity
};

struct S3Error {
  std::string code;
  std::string message;
};

S3Error ParseError(std::string_view body) {
  S3Error e;
  pugi::xml_document doc;
  if (body.empty() || !doc.load_buffer(body.data(), body.size())) return e;
  pugi::xml_node err = doc.child("Error");
  e.code = err.child_value("Code");
  e.message = err.child_value("Message");
  return e;
}

// A Content-Range header "bytes FIRST-LAST/TOTAL"; nullopt if malformed or TOTAL is unknown ("*").
struct ContentRange {
  uint64_t first = 0, last = 0, total = 0;
};
std::optional<ContentRange> ParseContentRange(std::string_view h) {
  ContentRange r;
  if (!h.starts_with("bytes ")) return std::nullopt;
  h.remove_prefix(6);
  const size_t dash = h.find('-'), slash = h.find('/');
  if (dash == std::string_view::npos || slash == std::string_view::npos || dash > slash) {
    return std::nullopt;
  }
  auto number = [](std::string_view t, uint64_t& out) {
    auto [end, ec] = std::from_chars(t.data(), t.data() + t.size(), out);
    return ec == std::errc() && end == t.data() + t.size() && !t.empty();
  };
  if (!number(h.substr(0, dash), r.first) ||
      !number(h.substr(dash + 1, slash - dash - 1), r.last) ||
      !number(h.substr(slash + 1), r.total) || r.first > r.last || r.last >= r.total) {
    return std::nullopt;
  }
  return r;
}

bool RetryableHttp(long code, const Response& r) {
  if (code >= 500 || code == 429) return true;
  if (code == 400) {
    std::string c = ParseError(r.body).code;
    return c == "RequestTimeout" || c == "RequestTimeTooSkewed";
  }
  return false;
}

bool RetryableCurl(CURLcode c) {
  switch (c) {
    case CURLE_COULDNT_CONNECT:
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_OPERATION_TIMEDOUT:
    case CURLE_SEND_ERROR:
    case CURLE_RECV_ERROR:
    case CURLE_GOT_NOTHING:
    case CURLE_PARTIAL_FILE:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
      return true;
    default:
      return false;
  }
}

class Client {
 public:
  Client(const S3Options& o, std::string bucket) : options_(o), bucket_(std::move(bucket)) {
    std::string ep = o.endpoint;
    const bool aws = ep.empty();
    if (aws) ep = "https://s3." + o.region + ".amazonaws.com";
    while (!ep.empty() && ep.back() == '/') ep.pop_back();
    const bool path_style = o.path_style.value_or(!aws);
    if (path_style) {
      base_ = ep + "/" + UriEncode(bucket_, false);
    } else {
      size_t scheme_end = ep.find("://");
      size_t host = scheme_end == std::string::npos ? 0 : scheme_end + 3;
      base_ = ep.substr(0, host) + bucket_ + "." + ep.substr(host);
    }
    sigv4_ = "aws:amz:" + o.region + ":s3";
  }
  ~Client() {
    for (CURL* h : idle_) curl_easy_cleanup(h);
  }

  const S3Options& options() const { return options_; }

  // Runs `req` with retries. OK once an answer arrived that is not retryable (any HTTP code: the
  // caller judges it); Unavailable when retries ran out; DataLoss if a GET overflowed `dst`.
  Status Perform(const Request& req, Response& resp, std::string_view what) {
    Status last;
    for (int attempt = 0;; ++attempt) {
      resp = Response();
      CURLcode cc = PerformOnce(req, resp);
      if (cc == CURLE_WRITE_ERROR && resp.overflow) {
        return DataLossError(std::string(what) + ": the server sent more bytes than asked for");
      }
      bool retry;
      if (cc != CURLE_OK) {
        retry = RetryableCurl(cc);
        last = UnavailableError(std::string(what) + ": " + curl_easy_strerror(cc));
        if (!retry) return last;
      } else {
        retry = RetryableHttp(resp.code, resp);
        if (!retry) return Status::Ok();
        last = UnavailableError(std::string(what) + ": " + Describe(resp));
      }
      if (attempt >= options_.max_retries) {
        return UnavailableError(std::string(last.message()) + " (gave up after " +
                                std::to_string(attempt + 1) + " attempts)");
      }
      std::this_thread::sleep_for(Backoff(attempt));
    }
  }

  // "HTTP 404 NoSuchKey: The specified key does not exist."
  static std::string Describe(const Response& r) {
    S3Error e = ParseError(r.body);
    std::string s = "HTTP " + std::to_string(r.code);
    if (!e.code.empty()) s += " " + e.code;
    if (!e.message.empty()) s += ": " + e.message;
    return s;
  }

  // The Status of a completed, non-2xx answer.
  Status HttpError(const Response& r, std::string_view what) const {
    std::string msg = std::string(what) + ": " + Describe(r);
    switch (r.code) {
      case 404:
        return NotFoundError(msg);
      case 403:
        return FailedPreconditionError(
            msg +
            " (access denied: check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "AWS_SESSION_TOKEN and the bucket's policy)");
      case 412:
        return FailedPreconditionError(msg + " (the object changed after it was opened)");
      case 416:
        return DataLossError(msg);
      case 409:
        return AbortedError(msg);
      default:
        if (r.code >= 500 || r.code == 429) return UnavailableError(msg);
        return InvalidArgumentError(msg);
    }
  }

 private:
  std::chrono::milliseconds Backoff(int attempt) {
    thread_local std::mt19937 rng(std::random_device{}());
    const double cap = std::min<double>(options_.max_backoff_ms,
                                        options_.initial_backoff_ms * std::pow(2.0, attempt));
    std::uniform_real_distribution<double> jitter(0.5, 1.0);
    return std::chrono::milliseconds(static_cast<int64_t>(cap * jitter(rng)));
  }

  CURL* Acquire() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!idle_.empty()) {
        CURL* h = idle_.back();
        idle_.pop_back();
        return h;
      }
    }
    return curl_easy_init();
  }
  void Release(CURL* h) {
    std::lock_guard<std::mutex> lock(mu_);
    idle_.push_back(h);  // keeps its connection alive for the next request
  }

  struct Upload {
    std::string_view body;
    size_t pos = 0;
  };

  static size_t ReadBody(char* buf, size_t size, size_t n, void* p) {
    auto* u = static_cast<Upload*>(p);
    size_t k = std::min(size * n, u->body.size() - u->pos);
    std::memcpy(buf, u->body.data() + u->pos, k);
    u->pos += k;
    return k;
  }

  struct Sink {
    const Request* req;
    Response* resp;
    CURL* handle;
  };

  static size_t WriteBody(char* data, size_t size, size_t n, void* p) {
    auto* s = static_cast<Sink*>(p);
    const size_t k = size * n;
    long code = 0;
    curl_easy_getinfo(s->handle, CURLINFO_RESPONSE_CODE, &code);
    // Error bodies (and anything but a successful GET into dst) go to the string.
    if (s->req->dst == nullptr || code < 200 || code >= 300) {
      if (s->resp->body.size() + k > (size_t{1} << 24)) return 0;  // no answer is this large
      s->resp->body.append(data, k);
      return k;
    }
    if (s->resp->received + k > s->req->capacity) {
      s->resp->overflow = true;
      return 0;
    }
    std::memcpy(s->req->dst + s->resp->received, data, k);
    s->resp->received += k;
    return k;
  }

  static size_t Header(char* data, size_t size, size_t n, void* p) {
    auto* resp = static_cast<Response*>(p);
    std::string_view line(data, size * n);
    if (line.starts_with("HTTP/")) {
      resp->headers.clear();  // a new status line (after 100 Continue or a redirect)
      return size * n;
    }
    size_t colon = line.find(':');
    if (colon != std::string_view::npos) {
      std::string_view v = line.substr(colon + 1);
      while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
      while (!v.empty() && (v.back() == '\r' || v.back() == '\n' || v.back() == ' ')) {
        v.remove_suffix(1);
      }
      resp->headers[Lower(std::string(line.substr(0, colon)))] = std::string(v);
    }
    return size * n;
  }

  CURLcode PerformOnce(const Request& req, Response& resp) {
    CURL* h = Acquire();
    if (h == nullptr) return CURLE_FAILED_INIT;
    curl_easy_reset(h);
    std::string url = base_;
    if (!req.object.empty()) url += "/" + UriEncode(req.object, true);
    if (!req.query.empty()) url += "?" + req.query;
    curl_easy_setopt(h, CURLOPT_URL, url.c_str());
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(options_.connect_timeout_ms));
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, static_cast<long>(options_.stall_timeout_s));
    // No wait for "100 Continue" before a body. (Removing the Expect header with "Expect:" would
    // not do: libcurl 7.88 signs the removed header, and S3 then refuses the signature.)
    curl_easy_setopt(h, CURLOPT_EXPECT_100_TIMEOUT_MS, 0L);
    if (!options_.access_key_id.empty()) {
      curl_easy_setopt(h, CURLOPT_AWS_SIGV4, sigv4_.c_str());
      curl_easy_setopt(h, CURLOPT_USERNAME, options_.access_key_id.c_str());
      curl_easy_setopt(h, CURLOPT_PASSWORD, options_.secret_access_key.c_str());
    }
    curl_slist* headers = nullptr;
    // S3 wants the payload hash header; the payload itself is not hashed (TLS protects it).
    headers = curl_slist_append(headers, "x-amz-content-sha256: UNSIGNED-PAYLOAD");
    if (!options_.session_token.empty()) {
      headers =
          curl_slist_append(headers, ("x-amz-security-token: " + options_.session_token).c_str());
    }
    for (const std::string& hd : req.headers) headers = curl_slist_append(headers, hd.c_str());
    curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);

    Upload upload{req.body, 0};
    if (req.method == "HEAD") {
      curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
    } else if (req.method == "PUT") {
      curl_easy_setopt(h, CURLOPT_UPLOAD, 1L);
      curl_easy_setopt(h, CURLOPT_INFILESIZE_LARGE, static_cast<curl_off_t>(req.body.size()));
      curl_easy_setopt(h, CURLOPT_READFUNCTION, &ReadBody);
      curl_easy_setopt(h, CURLOPT_READDATA, &upload);
    } else if (req.method == "POST") {
      curl_easy_setopt(h, CURLOPT_POST, 1L);
      curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(req.body.size()));
      curl_easy_setopt(h, CURLOPT_POSTFIELDS, req.body.data());
    } else if (req.method != "GET") {
      curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, req.method.c_str());
    }
    Sink sink{&req, &resp, h};
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, &WriteBody);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &sink);
    curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, &Header);
    curl_easy_setopt(h, CURLOPT_HEADERDATA, &resp);

    CURLcode cc = curl_easy_perform(h);
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &resp.code);
    curl_slist_free_all(headers);
    if (cc == CURLE_OK) {
      Release(h);
    } else {
      curl_easy_cleanup(h);  // a broken connection is not reused
    }
    return cc;
  }

  const S3Options options_;
  const std::string bucket_;
  std::string base_;
  std::string sigv4_;
  std::mutex mu_;
  std::vector<CURL*> idle_;
};

// ------------------------------------------------------------------ the store

class S3Store;

constexpr size_t kPartsPerBatch = 4;

class S3Writer final : public WritableFile {
 public:
  S3Writer(S3Store& store, std::string key, std::string object);
  ~S3Writer() override;
  Status Append(const void* data, size_t n) override;
  Status Sync() override;
  Status Close() override;
  uint64_t position() const override { return position_; }
  std::string name() const override;

 private:
  Status UploadPending();
  Status Fail(Status s);
  void Abort();

  S3Store& store_;
  const std::string key_;
  const std::string object_;
  std::string buffer_;                // the part being filled
  std::vector<std::string> pending_;  // full parts not yet uploaded
  uint64_t position_ = 0;
  bool closed_ = false;
  Status error_;
  std::string upload_id_;
  std::vector<std::string> etags_;  // of parts 1, 2, ...
};

class S3Reader final : public ReadableFile {
 public:
  S3Reader(S3Store& store, std::string key, std::string object, uint64_t size, std::string etag,
           std::string head)
      : store_(store),
        key_(std::move(key)),
        object_(std::move(object)),
        size_(size),
        etag_(std::move(etag)),
        head_(std::move(head)) {}
  uint64_t size() const override { return size_; }
  Status ReadAt(uint64_t offset, void* dst, size_t n) const override;
  std::string name() const override;
  const std::byte* Peek(uint64_t offset, size_t n) const override {
    if (offset > head_.size() || n > head_.size() - offset) return nullptr;
    return reinterpret_cast<const std::byte*>(head_.data()) + offset;
  }

 private:
  struct Block {
    uint64_t offset = 0;
    std::string data;
  };
  Status ReadRange(uint64_t offset, char* dst, size_t n) const;
  Result<std::shared_ptr<const Block>> GetBlock(uint64_t offset, size_t length) const;

  S3Store& store_;
  const std::string key_;
  const std::string object_;
  const uint64_t size_;
  const std::string etag_;
  const std::string head_;  // the first bytes (the whole object when small)
  mutable std::mutex cache_mu_;
  mutable std::deque<std::shared_ptr<const Block>> cache_;  // most recently fetched last
};

class S3Store final : public Store {
 public:
  S3Store(const S3Options& options, std::string bucket, std::string prefix)
      : client_(options, bucket), bucket_(std::move(bucket)), prefix_(std::move(prefix)) {}

  Client& client() { return client_; }
  const S3Options& options() const { return client_.options(); }

  std::string Object(std::string_view key) const {
    return prefix_.empty() ? std::string(key) : prefix_ + "/" + std::string(key);
  }
  std::string Url() const { return "s3://" + bucket_ + (prefix_.empty() ? "" : "/" + prefix_); }
  std::string Describe(std::string_view key) const override {
    return "s3://" + bucket_ + "/" + Object(key);
  }

  // HEAD of an object: its size and ETag, or NotFound.
  struct Head {
    uint64_t size = 0;
    std::string etag;
  };
  Result<Head> HeadObject(std::string_view key) {
    Request req{.method = "HEAD", .object = Object(key)};
    Response resp;
    const std::string what = "HEAD " + Describe(key);
    DCPP_RETURN_IF_ERROR(client_.Perform(req, resp, what));
    if (resp.code == 404) return NotFoundError(what + ": no such object");
    if (resp.code != 200) return client_.HttpError(resp, what);
    Head h;
    h.etag = resp.headers["etag"];
    const std::string& len = resp.headers["content-length"];
    h.size = std::strtoull(len.c_str(), nullptr, 10);
    return h;
  }

  // Up to max_keys object keys (full object names) under `object_prefix`, in order.
  Result<std::vector<std::string>> ListObjects(const std::string& object_prefix, int max_keys) {
    std::vector<std::string> out;
    std::string token;
    while (true) {
      std::vector<std::pair<std::string, std::string>> q = {{"list-type", "2"},
                                                            {"prefix", object_prefix}};
      if (max_keys > 0) q.push_back({"max-keys", std::to_string(max_keys)});
      if (!token.empty()) q.push_back({"continuation-token", token});
      Request req{.method = "GET", .query = Query(q)};
      Response resp;
      const std::string what = "listing " + Url();
      DCPP_RETURN_IF_ERROR(client_.Perform(req, resp, what));
      if (resp.code != 200) return client_.HttpError(resp, what);
      pugi::xml_document doc;
      if (!doc.load_buffer(resp.body.data(), resp.body.size())) {
        return DataLossError(what + ": the server's answer is not XML");
      }
      // The root's name is not checked: S3-compatible servers differ in it (as in the upload's
      // answer below), and clients such as botocore read only the children.
      pugi::xml_node result = doc.document_element();
      for (pugi::xml_node c : result.children("Contents")) out.push_back(c.child_value("Key"));
      if (max_keys > 0 && static_cast<int>(out.size()) >= max_keys) break;
      if (std::string_view(result.child_value("IsTruncated")) != "true") break;
      token = result.child_value("NextContinuationToken");
      if (token.empty()) return DataLossError(what + ": truncated listing without a token");
    }
    return out;
  }

  // The file system's rules on S3: no object may be a parent "directory" of `key`, and `key`
  // may not be a "directory" (a prefix of other objects).
  Status CheckNoClash(std::string_view key) {
    for (size_t slash = key.find('/'); slash != std::string_view::npos;
         slash = key.find('/', slash + 1)) {
      auto h = HeadObject(key.substr(0, slash));
      if (h.ok()) {
        return FailedPreconditionError(Describe(key) + ": \"" + std::string(key.substr(0, slash)) +
                                       "\" is a file, not a directory");
      }
      if (h.status().code() != StatusCode::kNotFound) return h.status();
    }
    DCPP_ASSIGN_OR_RETURN(auto under, ListObjects(Object(key) + "/", 1));
    if (!under.empty()) {
      return FailedPreconditionError(Describe(key) + " is a directory (objects exist under it)");
    }
    return Status::Ok();
  }

  Result<std::unique_ptr<WritableFile>> OpenWrite(std::string_view key) override {
    DCPP_RETURN_IF_ERROR(ValidateKey(key));
    DCPP_RETURN_IF_ERROR(CheckNoClash(key));
    return std::unique_ptr<WritableFile>(
        std::make_unique<S3Writer>(*this, std::string(key), Object(key)));
  }

  Result<std::unique_ptr<ReadableFile>> OpenRead(std::string_view key) override {
    DCPP_RETURN_IF_ERROR(ValidateKey(key));
    const std::string what = "reading " + Describe(key);
    const size_t prefetch = std::max<size_t>(options().open_prefetch, 1);
    std::string head(prefetch, '\0');
    Request req{.method = "GET", .object = Object(key)};
    req.headers.push_back("Range: bytes=0-" + std::to_string(prefetch - 1));
    req.dst = head.data();
    req.capacity = head.size();
    Response resp;
    DCPP_RETURN_IF_ERROR(client_.Perform(req, resp, what));
    uint64_t size = 0;
    std::string etag = resp.headers["etag"];
    if (resp.code == 404) return NotFoundError(what + ": no such object");
    if (resp.code == 416) {
      // An empty object has no byte 0.
      DCPP_ASSIGN_OR_RETURN(Head h, HeadObject(key));
      size = h.size;
      etag = h.etag;
      if (size != 0) return DataLossError(what + ": the server refused the first bytes");
      head.clear();
    } else if (resp.code == 206 || resp.code == 200) {
      // A ranged answer says the object's size in Content-Range. Some S3-compatible servers
      // (rclone serve s3) send it with 200 instead of 206; a 200 without it is the whole object,
      // whose size is its Content-Length (it may exceed the prefetch, which then overflows).
      auto it = resp.headers.find("content-range");
      if (it != resp.headers.end()) {
        auto range = ParseContentRange(it->second);
        if (!range || range->first != 0) {
          return DataLossError(what + ": bad Content-Range \"" + it->second + "\"");
        }
        size = range->total;
      } else if (resp.code == 206) {
        return DataLossError(what + ": no Content-Range");
      } else {
        size = resp.received;  // the server sent the whole (small) object
      }
      head.resize(resp.received);
    } else {
      return client_.HttpError(resp, what);
    }
    if (head.size() != std::min<uint64_t>(size, prefetch)) {
      return DataLossError(what + ": got " + std::to_string(head.size()) + " of the first " +
                           std::to_string(std::min<uint64_t>(size, prefetch)) + " bytes");
    }
    return std::unique_ptr<ReadableFile>(std::make_unique<S3Reader>(
        *this, std::string(key), Object(key), size, std::move(etag), std::move(head)));
  }

  Result<bool> Exists(std::string_view key) override {
    DCPP_RETURN_IF_ERROR(ValidateKey(key));
    auto h = HeadObject(key);
    if (h.ok()) return true;
    if (h.status().code() == StatusCode::kNotFound) return false;
    return h.status();
  }

  Result<uint64_t> Size(std::string_view key) override {
    DCPP_RETURN_IF_ERROR(ValidateKey(key));
    DCPP_ASSIGN_OR_RETURN(Head h, HeadObject(key));
    return h.size;
  }

  Result<std::vector<std::string>> List() override {
    const std::string p = prefix_.empty() ? "" : prefix_ + "/";
    DCPP_ASSIGN_OR_RETURN(std::vector<std::string> objects, ListObjects(p, 0));
    std::vector<std::string> keys;
    for (std::string& o : objects) {
      std::string key = o.substr(p.size());
      // Objects that no Store could have written ("a//b", console "folder/" markers) are skipped.
      if (ValidateKey(key).ok()) keys.push_back(std::move(key));
    }
    std::sort(keys.begin(), keys.end());
    return keys;
  }

  Status Remove(std::string_view key) override {
    DCPP_RETURN_IF_ERROR(ValidateKey(key));
    // S3 deletes absent objects silently; the contract says NotFound.
    DCPP_RETURN_IF_ERROR(HeadObject(key).status().WithContext("removing"));
    return DeleteObject(key);
  }

  Status DeleteObject(std::string_view key) {
    Request req{.method = "DELETE", .object = Object(key)};
    Response resp;
    const std::string what = "DELETE " + Describe(key);
    DCPP_RETURN_IF_ERROR(client_.Perform(req, resp, what));
    if (resp.code != 204 && resp.code != 200) return client_.HttpError(resp, what);
    return Status::Ok();
  }

  // Not atomic on S3: a server-side copy, then a delete of the source.
  Status Rename(std::string_view from, std::string_view to) override {
    DCPP_RETURN_IF_ERROR(ValidateKey(from));
    DCPP_RETURN_IF_ERROR(ValidateKey(to));
    const std::string what = "renaming " + Describe(from) + " to " + Describe(to);
    DCPP_ASSIGN_OR_RETURN(Head h, HeadObject(from));
    if (h.size > (uint64_t{5} << 30)) {
      return UnimplementedError(what + ": objects over 5 GiB cannot be copied in one request");
    }
    DCPP_RETURN_IF_ERROR(CheckNoClash(to).WithContext(what));
    Request req{.method = "PUT", .object = Object(to)};
    req.headers.push_back("x-amz-copy-source: " +
                          UriEncode("/" + bucket_ + "/" + Object(from), true));
    Response resp;
    DCPP_RETURN_IF_ERROR(client_.Perform(req, resp, what));
    // A copy may fail after its 200 header: the error is then in the body.
    if (resp.code != 200 || !ParseError(resp.body).code.empty()) {
      return client_.HttpError(resp, what);
    }
    return DeleteObject(from).WithContext(what);
  }

  // Nothing to make durable: a closed object is. A directory exists if objects live under it.
  Status SyncDir(std::string_view dir) override {
    if (dir.empty()) return Status::Ok();
    DCPP_RETURN_IF_ERROR(ValidateKey(dir));
    DCPP_ASSIGN_OR_RETURN(auto under, ListObjects(Object(dir) + "/", 1));
    if (under.empty()) return NotFoundError("syncing " + Describe(dir) + ": no such directory");
    return Status::Ok();
  }

  // The bucket exists (created when options allow); a prefix needs no creation.
  Status CreateDir() override { return EnsureBucket(options().create_bucket); }

  Status EnsureBucket(bool create) {
    const std::string what = "bucket s3://" + bucket_;
    Request head{.method = "HEAD"};
    Response resp;
    DCPP_RETURN_IF_ERROR(client_.Perform(head, resp, "HEAD " + what));
    if (resp.code == 200) return Status::Ok();
    if (resp.code != 404) return client_.HttpError(resp, "HEAD " + what);
    if (!create) return NotFoundError(what + " does not exist");
    std::string config;
    if (options().region != "us-east-1") {
      config =
          "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">"
          "<LocationConstraint>" +
          options().region + "</LocationConstraint></CreateBucketConfiguration>";
    }
    Request put{.method = "PUT", .body = config};
    DCPP_RETURN_IF_ERROR(client_.Perform(put, resp, "creating " + what));
    if (resp.code == 200) return Status::Ok();
    if (ParseError(resp.body).code == "BucketAlreadyOwnedByYou") return Status::Ok();
    if (resp.code == 409) {
      // Another rank (or job) created it first. S3 says BucketAlreadyOwnedByYou; gofakes3 says
      // BucketAlreadyExists, which on S3 means someone else's: whether it is usable is what a
      // second HEAD answers.
      Response again;
      DCPP_RETURN_IF_ERROR(client_.Perform(head, again, "HEAD " + what));
      if (again.code == 200) return Status::Ok();
    }
    return client_.HttpError(resp, "creating " + what);
  }

  // One upload: S3 makes the object appear whole, so no temporary and no rename are needed.
  Status WriteAtomic(std::string_view key, std::string_view bytes) override {
    return WriteAtomic(key,
                       [bytes](ByteSink& sink) { return sink.Write(bytes.data(), bytes.size()); });
  }
  Status WriteAtomic(std::string_view key, const std::function<Status(ByteSink&)>& fill) override {
    DCPP_RETURN_IF_ERROR(ValidateKey(key));
    const std::string what = "writing " + Describe(key) + " atomically";
    auto opened = OpenWrite(key);
    if (!opened.ok()) return opened.status().WithContext(what);
    std::unique_ptr<WritableFile> file = *std::move(opened);
    Status s = fill(*file);
    if (s.ok()) s = file->Close();  // the object appears here, whole; a failed fill aborts it
    return s.WithContext(what);
  }

 private:
  Client client_;
  const std::string bucket_;
  const std::string prefix_;
};

// ------------------------------------------------------------------ writer

S3Writer::S3Writer(S3Store& store, std::string key, std::string object)
    : store_(store), key_(std::move(key)), object_(std::move(object)) {}

S3Writer::~S3Writer() {
  if (!closed_) Abort();
}

std::string S3Writer::name() const { return store_.Describe(key_); }

Status S3Writer::Append(const void* data, size_t n) {
  if (closed_) return FailedPreconditionError(name() + ": append after close");
  DCPP_RETURN_IF_ERROR(error_);
  const char* p = static_cast<const char*>(data);
  const size_t part = std::max<size_t>(store_.options().part_size, size_t{5} << 20);
  while (n > 0) {
    if (buffer_.capacity() < part) buffer_.reserve(part);
    const size_t k = std::min(n, part - buffer_.size());
    buffer_.append(p, k);
    p += k;
    n -= k;
    position_ += k;
    if (buffer_.size() == part) {
      pending_.push_back(std::move(buffer_));
      buffer_ = std::string();
      // A batch of parts goes up in parallel; buffered memory stays at most a batch per file.
      if (pending_.size() == kPartsPerBatch) DCPP_RETURN_IF_ERROR(UploadPending());
    }
  }
  return Status::Ok();
}

Status S3Writer::Sync() {
  if (closed_) return FailedPreconditionError(name() + ": sync after close");
  return error_;  // S3 has nothing to sync: the object is durable once Close completes it
}

Status S3Writer::Fail(Status s) {
  error_ = s;
  Abort();
  return s;
}

// Uploads the pending parts in parallel on the thread pool (the caller's thread takes part),
// starting the multipart upload first if this is the first batch.
Status S3Writer::UploadPending() {
  Client& client = store_.client();
  if (upload_id_.empty()) {
    Request req{.method = "POST", .object = object_, .query = Query({{"uploads", ""}})};
    Response resp;
    const std::string what = "starting the upload of " + name();
    DCPP_RETURN_IF_ERROR(client.Perform(req, resp, what));
    if (resp.code != 200) return Fail(client.HttpError(resp, what));
    pugi::xml_document doc;
    doc.load_buffer(resp.body.data(), resp.body.size());
    // S3 names the root InitiateMultipartUploadResult; gofakes3 (rclone serve s3) names it
    // InitiateMultipartUpload. Only the UploadId child matters.
    upload_id_ = doc.document_element().child_value("UploadId");
    if (upload_id_.empty()) return Fail(DataLossError(what + ": no UploadId in the answer"));
  }
  const size_t first = etags_.size();
  if (first + pending_.size() > 10000) {
    return Fail(InvalidArgumentError(name() + ": more than 10000 parts of " +
                                     std::to_string(pending_[0].size()) +
                                     " bytes; raise S3Options::part_size"));
  }
  etags_.resize(first + pending_.size());
  const std::vector<Status> statuses =
      internal::ParallelFor(pending_.size(), pending_.size(), [&](size_t i) -> Status {
        const int number = static_cast<int>(first + i + 1);
        const std::string what = "uploading part " + std::to_string(number) + " of " + name();
        Request req{
            .method = "PUT",
            .object = object_,
            .query = Query({{"partNumber", std::to_string(number)}, {"uploadId", upload_id_}}),
            .body = pending_[i]};
        Response resp;
        DCPP_RETURN_IF_ERROR(client.Perform(req, resp, what));
        if (resp.code != 200) return client.HttpError(resp, what);
        etags_[first + i] = resp.headers["etag"];
        if (etags_[first + i].empty()) return DataLossError(what + ": no ETag in the answer");
        return Status::Ok();
      });
  pending_.clear();
  Status s = internal::FirstError(statuses);
  return s.ok() ? s : Fail(s);
}

void S3Writer::Abort() {
  if (upload_id_.empty()) return;
  Request req{.method = "DELETE", .object = object_, .query = Query({{"uploadId", upload_id_}})};
  Response resp;
  (void)store_.client().Perform(req, resp, "aborting the upload of " + name());  // best effort
  upload_id_.clear();
}

Status S3Writer::Close() {
  if (closed_) return FailedPreconditionError(name() + ": already closed");
  closed_ = true;
  if (!error_.ok()) return error_;
  Client& client = store_.client();
  if (upload_id_.empty() && pending_.empty()) {
    Request req{.method = "PUT", .object = object_, .body = buffer_};
    Response resp;
    const std::string what = "PUT " + name();
    DCPP_RETURN_IF_ERROR(client.Perform(req, resp, what));
    if (resp.code != 200) return client.HttpError(resp, what);
    std::string().swap(buffer_);
    return Status::Ok();
  }
  if (!buffer_.empty()) pending_.push_back(std::move(buffer_));
  if (!pending_.empty()) DCPP_RETURN_IF_ERROR(UploadPending());
  pugi::xml_document doc;
  pugi::xml_node root = doc.append_child("CompleteMultipartUpload");
  for (size_t i = 0; i < etags_.size(); ++i) {
    pugi::xml_node part = root.append_child("Part");
    part.append_child("PartNumber").text().set(static_cast<int>(i + 1));
    part.append_child("ETag").text().set(etags_[i].c_str());
  }
  std::ostringstream xml;
  doc.save(xml, "", pugi::format_raw);
  const std::string body = xml.str();
  Request req{.method = "POST",
              .object = object_,
              .query = Query({{"uploadId", upload_id_}}),
              .headers = {"Content-Type: application/xml"},
              .body = body};
  Response resp;
  const std::string what = "completing the upload of " + name();
  Status s = client.Perform(req, resp, what);
  // Completion can fail after its 200 header: the error is then in the body.
  if (s.ok() && (resp.code != 200 || !ParseError(resp.body).code.empty())) {
    s = client.HttpError(resp, what);
  }
  if (!s.ok()) return Fail(s);
  upload_id_.clear();
  return Status::Ok();
}

// ------------------------------------------------------------------ reader

std::string S3Reader::name() const { return store_.Describe(key_); }

Status S3Reader::ReadAt(uint64_t offset, void* dst, size_t n) const {
  if (offset > size_ || n > size_ - offset) {
    return DataLossError(name() + ": read of " + std::to_string(n) + " bytes at " +
                         std::to_string(offset) + " is past the end (" + std::to_string(size_) +
                         " bytes)");
  }
  if (n == 0) return Status::Ok();
  char* out = static_cast<char*>(dst);
  // The part already fetched at open.
  if (offset < head_.size()) {
    const size_t k = std::min<uint64_t>(n, head_.size() - offset);
    std::memcpy(out, head_.data() + offset, k);
    offset += k;
    out += k;
    n -= k;
  }
  if (n == 0) return Status::Ok();
  const size_t block = store_.options().small_read_block;
  if (block > 0 && n <= block / 4 && offset / block == (offset + n - 1) / block) {
    const uint64_t start = offset / block * block;
    DCPP_ASSIGN_OR_RETURN(auto b, GetBlock(start, std::min<uint64_t>(block, size_ - start)));
    std::memcpy(out, b->data.data() + (offset - start), n);
    return Status::Ok();
  }
  const size_t piece = std::max<size_t>(store_.options().read_part_size, 1);
  if (n <= piece) return ReadRange(offset, out, n);
  const size_t pieces = (n + piece - 1) / piece;
  return internal::FirstError(internal::ParallelFor(
      pieces, static_cast<size_t>(std::max(store_.options().max_parallel, 1)), [&](size_t i) {
        const size_t done = i * piece;
        return ReadRange(offset + done, out + done, std::min(piece, n - done));
      }));
}

Result<std::shared_ptr<const S3Reader::Block>> S3Reader::GetBlock(uint64_t offset,
                                                                  size_t length) const {
  {
    std::lock_guard<std::mutex> lock(cache_mu_);
    for (const auto& b : cache_) {
      if (b->offset == offset) return b;
    }
  }
  // Fetched unlocked: two threads may fetch one block at once, which is harmless.
  auto b = std::make_shared<Block>();
  b->offset = offset;
  b->data.resize(length);
  DCPP_RETURN_IF_ERROR(ReadRange(offset, b->data.data(), length));
  std::lock_guard<std::mutex> lock(cache_mu_);
  cache_.push_back(b);
  if (cache_.size() > 8) cache_.pop_front();
  return std::shared_ptr<const Block>(std::move(b));
}

Status S3Reader::ReadRange(uint64_t offset, char* dst, size_t n) const {
  Request req{.method = "GET", .object = object_};
  req.headers.push_back("Range: bytes=" + std::to_string(offset) + "-" +
                        std::to_string(offset + n - 1));
  if (!etag_.empty()) req.headers.push_back("If-Match: " + etag_);
  req.dst = dst;
  req.capacity = n;
  Response resp;
  const std::string what =
      "reading " + name() + " [" + std::to_string(offset) + ", +" + std::to_string(n) + "]";
  DCPP_RETURN_IF_ERROR(store_.client().Perform(req, resp, what));
  if (resp.code != 206 && resp.code != 200) return store_.client().HttpError(resp, what);
  // The bytes must be the ones asked for: a 206 (or a 200 that some servers send for a range)
  // names its range, and a 200 without one is the whole object.
  if (auto it = resp.headers.find("content-range"); it != resp.headers.end()) {
    auto range = ParseContentRange(it->second);
    if (!range || range->first != offset || range->last != offset + n - 1 ||
        range->total != size_) {
      return DataLossError(what + ": the server sent Content-Range \"" + it->second + "\"");
    }
  } else if (resp.code == 206 || offset != 0 || n != size_) {
    return DataLossError(what + ": the answer has no Content-Range");
  }
  if (resp.received != n) {
    return DataLossError(what + ": got " + std::to_string(resp.received) + " bytes");
  }
  return Status::Ok();
}

}  // namespace

bool S3StoreAvailable() { return true; }

Result<std::unique_ptr<Store>> OpenS3Store(std::string_view url, const S3Options& options,
                                           const StoreOpenOptions& open) {
  InitCurlOnce();
  if (!url.starts_with("s3://")) {
    return InvalidArgumentError("\"" + std::string(url) + "\" is not an s3:// URL");
  }
  std::string_view rest = url.substr(5);
  size_t slash = rest.find('/');
  std::string bucket(rest.substr(0, slash));
  std::string prefix(slash == std::string_view::npos ? "" : rest.substr(slash + 1));
  while (!prefix.empty() && prefix.back() == '/') prefix.pop_back();
  if (!ValidBucket(bucket)) {
    return InvalidArgumentError("\"" + std::string(url) +
                                "\": a bucket name is 3 to 63 of a-z, 0-9, '.' and '-'");
  }
  if (!prefix.empty()) {
    DCPP_RETURN_IF_ERROR(ValidateKey(prefix).WithContext("\"" + std::string(url) + "\""));
  }
  auto store = std::make_unique<S3Store>(options, bucket, prefix);
  DCPP_RETURN_IF_ERROR(store->EnsureBucket(open.create && options.create_bucket));
  return std::unique_ptr<Store>(std::move(store));
}

}  // namespace dcpp

#endif  // DCPP_HAVE_S3
