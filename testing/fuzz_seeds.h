// Seed corpora of the libFuzzer targets (tests/fuzz/<target>/), made from real encodings.
//
// A test builds the encodings of real plans or results and calls ExpectFuzzSeeds: each must be
// committed, byte for byte, as tests/fuzz/<target>/<name>, so the seeds always are what the
// current code writes. With DCPP_WRITE_FUZZ_SEEDS=1 in the environment the files are (re)written
// instead, after an intended change of an encoding.
// Thread-safety: call from one test thread.
#pragma once

#include <map>
#include <string>

namespace dcpp::testing {

void ExpectFuzzSeeds(const std::string& target, const std::map<std::string, std::string>& seeds);

}  // namespace dcpp::testing
