// Whether this build runs under a sanitizer, for the few assertions that measure the process
// itself (RSS, page faults, wall time) and mean nothing there: ASan holds freed memory in its
// quarantine and maps shadow pages on first touch; TSan does likewise with its own shadow.
// Leaks are LeakSanitizer's business in those builds. Thread-safety: constants.
#pragma once

namespace dcpp::testing {

#if defined(__SANITIZE_ADDRESS__)
inline constexpr bool kAddressSanitizer = true;
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
inline constexpr bool kAddressSanitizer = true;
#else
inline constexpr bool kAddressSanitizer = false;
#endif
#else
inline constexpr bool kAddressSanitizer = false;
#endif

#if defined(__SANITIZE_THREAD__)
inline constexpr bool kThreadSanitizer = true;
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
inline constexpr bool kThreadSanitizer = true;
#else
inline constexpr bool kThreadSanitizer = false;
#endif
#else
inline constexpr bool kThreadSanitizer = false;
#endif

inline constexpr bool kSanitizer = kAddressSanitizer || kThreadSanitizer;

}  // namespace dcpp::testing
