// OpenStore: a Store chosen by URL scheme.
//
// A plain path or a file:// URL is a local POSIX directory; any other "scheme://" is looked up in
// a registry that backends add themselves to (RegisterStoreScheme), so a new backend plugs in by
// registering one scheme and every layer that opens checkpoints by URL can use it.
#include <map>
#include <mutex>
#include <string>

#include "dcpp/storage.h"

#ifdef DCPP_HAVE_S3
#include "dcpp/s3_store.h"
#endif

namespace dcpp {
namespace {

struct Registry {
  std::mutex mu;
  std::map<std::string, StoreFactory, std::less<>> factories;
};

Registry& GetRegistry() {
  // Never destroyed: usable during static teardown. Built-in schemes are registered here because
  // a static library does not run its objects' static registrars.
  static Registry* registry = [] {
    auto* r = new Registry;
#ifdef DCPP_HAVE_S3
    // The environment is read at each open, so credentials set after start-up apply.
    r->factories["s3"] = [](std::string_view url, const StoreOpenOptions& options) {
      return OpenS3Store(url, S3OptionsFromEnv(), options);
    };
#endif
    return r;
  }();
  return *registry;
}

Result<std::unique_ptr<Store>> OpenFileUrl(std::string_view url, const StoreOpenOptions& options) {
  DCPP_ASSIGN_OR_RETURN(std::string path, LocalPathOfUrl(url));
  return OpenLocalStore(path, options.create);
}

}  // namespace

Result<std::string_view> UrlScheme(std::string_view url) {
  size_t colon = url.find("://");
  if (colon == std::string_view::npos) return std::string_view();
  std::string_view scheme = url.substr(0, colon);
  bool valid = !scheme.empty();
  for (char c : scheme) {
    valid = valid &&
            ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '+' || c == '-' || c == '.');
  }
  if (!valid) {
    return InvalidArgumentError("\"" + std::string(url) +
                                "\": a URL scheme is lower-case letters, digits, '+', '-', '.'");
  }
  return scheme;
}

Result<std::string> LocalPathOfUrl(std::string_view url) {
  DCPP_ASSIGN_OR_RETURN(std::string_view scheme, UrlScheme(url));
  if (scheme.empty()) return std::string(url);
  if (scheme != "file") {
    return InvalidArgumentError("\"" + std::string(url) + "\" is not a local path");
  }
  std::string_view rest = url.substr(7);  // after "file://"
  if (rest.starts_with("localhost/")) rest.remove_prefix(9);
  if (!rest.starts_with("/")) {
    return InvalidArgumentError("\"" + std::string(url) +
                                "\": a file URL names an absolute path (file:///dir)");
  }
  return std::string(rest);
}

void RegisterStoreScheme(std::string scheme, StoreFactory factory) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  r.factories[std::move(scheme)] = std::move(factory);
}

Result<std::unique_ptr<Store>> OpenStore(std::string_view url, const StoreOpenOptions& options) {
  if (url.empty()) return InvalidArgumentError("OpenStore: empty path");
  DCPP_ASSIGN_OR_RETURN(std::string_view scheme, UrlScheme(url));
  if (scheme.empty() || scheme == "file") return OpenFileUrl(url, options);
  StoreFactory factory;
  std::string known = "file";
  {
    Registry& r = GetRegistry();
    std::lock_guard<std::mutex> lock(r.mu);
    auto it = r.factories.find(scheme);
    if (it != r.factories.end()) factory = it->second;
    for (const auto& [name, f] : r.factories) known += ", " + name;
  }
  if (!factory) {
    return InvalidArgumentError("\"" + std::string(url) + "\": no store for scheme \"" +
                                std::string(scheme) + "://\" (known: " + known + ")");
  }
  return factory(url, options);
}

Result<StoreFile> OpenStoreFile(std::string_view url, const StoreOpenOptions& options) {
  DCPP_ASSIGN_OR_RETURN(std::string_view scheme, UrlScheme(url));
  // The part after "scheme://" (or the whole plain path) ends in the file's name.
  size_t body = scheme.empty() ? 0 : scheme.size() + 3;
  size_t slash = url.rfind('/');
  std::string_view parent, key;
  if (slash == std::string_view::npos || slash < body) {
    if (!scheme.empty()) {
      return InvalidArgumentError("\"" + std::string(url) + "\" does not name a file");
    }
    parent = ".";
    key = url;
  } else {
    parent = url.substr(0, slash);
    key = url.substr(slash + 1);
    if (parent.size() == body) {
      // "/x.pt" or "file:///x.pt": the parent is the root directory.
      parent = url.substr(0, slash + 1);
    }
  }
  if (key.empty()) return InvalidArgumentError("\"" + std::string(url) + "\" does not name a file");
  DCPP_RETURN_IF_ERROR(ValidateKey(key));
  StoreFile out;
  DCPP_ASSIGN_OR_RETURN(out.store, OpenStore(parent, options));
  out.key = std::string(key);
  return out;
}

}  // namespace dcpp
