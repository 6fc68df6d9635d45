// Fuzz target for the save-plan wire decoder (DecodeSavePlan), and for what the coordinator does
// with decoded plans. Seeds: tests/fuzz/save_plan_fuzz/ (local and global plans of real state
// dicts; plan_wire_test.cc writes them with DCPP_WRITE_FUZZ_SEEDS=1).
//
// Any input must decode or fail cleanly. A decoded plan must re-encode to bytes that decode to
// the same encoding again. The coordinator's global planning of one and of two copies of the plan
// (replicated items, the dedup path), with the plan cache on, must succeed or fail cleanly; what
// it accepts must be valid metadata that encodes, and plans that round-trip.
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "dcpp/metadata.h"
#include "dcpp/planner.h"

namespace {

void CheckRoundTrip(const dcpp::SavePlan& plan) {
  const std::string once = dcpp::EncodeSavePlan(plan);
  auto back = dcpp::DecodeSavePlan(once);
  if (!back.ok() || dcpp::EncodeSavePlan(*back) != once) __builtin_trap();
}

void PlanGlobally(const dcpp::SavePlan& plan, size_t ranks, bool lowest_rank) {
  dcpp::SavePlannerOptions options;
  options.enable_plan_caching = true;
  options.dedup_save_to_lowest_rank = lowest_rank;
  options.require_full_coverage = !lowest_rank;
  dcpp::DefaultSavePlanner coordinator(options);
  for (int pass = 0; pass < 2; ++pass) {  // the second pass is answered from the cache
    auto global = coordinator.CreateGlobalPlan(std::vector<dcpp::SavePlan>(ranks, plan));
    if (!global.ok()) return;
    if (global->first.size() != ranks) __builtin_trap();
    if (!dcpp::ValidateMetadata(global->second, "fuzz").ok()) __builtin_trap();
    if (!dcpp::EncodeMetadata(global->second).ok()) __builtin_trap();
    for (const auto& p : global->first) CheckRoundTrip(p);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto plan = dcpp::DecodeSavePlan(std::string_view(reinterpret_cast<const char*>(data), size));
  if (!plan.ok()) return 0;
  CheckRoundTrip(*plan);
  PlanGlobally(*plan, 1, false);
  PlanGlobally(*plan, 2, true);
  return 0;
}
