// An S3 Store: checkpoints in object storage (AWS S3 or any S3-compatible server), over libcurl.
//
// A URL "s3://bucket/prefix" names the store whose keys are objects "prefix/<key>" in `bucket`.
// OpenStore("s3://...") reaches it with options from the environment (S3OptionsFromEnv); a caller
// that needs other options registers its own factory: RegisterStoreScheme("s3",
// S3StoreFactory(options)).
//
// S3 has no rename, no fsync and no directories, so the Store contract maps onto it like this
// (docs/storage_comm.md, "Object storage"):
//   - an object appears whole when its WritableFile is closed (one PUT, or a multipart upload
//     completed at Close); a file destroyed without Close never appears;
//   - WriteAtomic is one upload: atomic per object, which is how `.metadata` commits last;
//   - Sync and SyncDir succeed without doing anything (a closed object is durable);
//   - Rename is a server-side copy and a delete, not atomic;
//   - a reader fixes the object's ETag at open: a small object is read whole at open, and later
//     ranged reads of a larger one fail with FailedPrecondition if the object was replaced;
//   - a file and a "directory" of the same name are refused, as on a file system.
// Large reads are split into ranged GETs run in parallel; large files are uploaded in parts, four
// at a time in parallel (a file buffers at most four parts), both on dcpp's one thread pool. 5xx
// answers, throttling and transport errors are retried with exponential backoff and end as
// Unavailable; 403 is FailedPrecondition, 404 NotFound, each naming the bucket, key and the
// server's error code.
//
// Without libcurl at build time OpenS3Store returns Unimplemented.
//
// Thread-safety: as for every Store; one S3 store may be used from many threads at once.
#pragma once

#include <cstddef>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "dcpp/status.h"
#include "dcpp/storage.h"

namespace dcpp {

struct S3Options {
  // "http://127.0.0.1:9000" or "https://s3.eu-west-1.amazonaws.com"; empty: AWS's endpoint for
  // `region`.
  std::string endpoint;
  std::string region = "us-east-1";
  std::string access_key_id;
  std::string secret_access_key;
  std::string session_token;  // temporary credentials; empty if none
  // Path-style addressing (endpoint/bucket/key) instead of virtual-hosted (bucket.endpoint/key).
  // Unset: path-style for a custom endpoint, virtual-hosted for AWS.
  std::optional<bool> path_style;
  // Files up to part_size are one PUT; larger ones a multipart upload of part_size parts
  // (S3 allows 5 MiB to 5 GiB per part, at most 10000 parts).
  size_t part_size = size_t{16} << 20;
  // Reads of more than this are split into ranged GETs of this size, run in parallel.
  size_t read_part_size = size_t{8} << 20;
  // A read of less than a quarter of this fetches the aligned block around it, and a reader keeps
  // its last 8 blocks: parsing a record's headers costs one request, not one per header.
  size_t small_read_block = size_t{256} << 10;
  // Ranged GETs in flight at once for one large read.
  int max_parallel = 16;
  // Bytes fetched by OpenRead with the object's size; an object this small is served from them.
  size_t open_prefetch = size_t{256} << 10;
  // Retries of a request after a 5xx, throttling or transport error; then Unavailable.
  int max_retries = 6;
  int initial_backoff_ms = 100;
  int max_backoff_ms = 5000;
  int connect_timeout_ms = 10000;
  // A transfer slower than 1 byte/s for this long is a timeout (retried).
  int stall_timeout_s = 30;
  // With StoreOpenOptions::create, create the bucket if it does not exist.
  bool create_bucket = true;
};

// Options from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION (or
// AWS_DEFAULT_REGION) and AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL); unset ones keep defaults.
S3Options S3OptionsFromEnv();

// Opens "s3://bucket[/prefix]". Without options.create the bucket must exist (NotFound).
Result<std::unique_ptr<Store>> OpenS3Store(std::string_view url, const S3Options& options,
                                           const StoreOpenOptions& open = {});

// A factory for RegisterStoreScheme that opens S3 stores with `options`.
StoreFactory S3StoreFactory(S3Options options);

// True if this build has the S3 store (libcurl was found).
bool S3StoreAvailable();

}  // namespace dcpp
