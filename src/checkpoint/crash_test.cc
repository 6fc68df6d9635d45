// Crash safety, proven by enumeration: a save that replaces a checkpoint has every one of its
// I/O operations failed in turn (each operation kind, each occurrence), and after each failure
// also a power cut (unsynced data and names dropped). Whatever happens, the checkpoint on the
// store is the old one or the new one, complete and bit-exact; a save that reported success is
// the new one even after the power cut.
#include "dcpp/checkpoint.h"
#include "dcpp/layout.h"
#include "testing/fault_store.h"
#include "testing/testing.h"

namespace dcpp {
namespace {

using ::dcpp::testing::PatternTensor;

Value State(uint64_t seed) {
  Value sd = Value::MakeDict();
  sd.Set("w", Value::FromTensor(PatternTensor(DType::kFloat32, {64, 33}, seed)));
  sd.Set("b", Value::FromTensor(PatternTensor(DType::kBFloat16, {17}, seed + 1)));
  sd.Set("step", Value::Int(static_cast<int64_t>(seed)));
  return sd;
}

// 1 or 2 if the store holds that version complete, 0 if it holds neither, -1 if nothing loads.
int Version(Store& store) {
  Value sd = Value::MakeDict();
  sd.Set("w", Value::FromTensor(Tensor::Zeros(DType::kFloat32, {64, 33})));
  sd.Set("b", Value::FromTensor(Tensor::Zeros(DType::kBFloat16, {17})));
  sd.Set("step", Value::Int(0));
  FileSystemReader reader(&store, "ck", {});
  if (!Load(sd, reader).ok()) return -1;
  for (int v : {1, 2}) {
    Value want = State(static_cast<uint64_t>(v));
    if (sd.Find("w")->tensor().BitwiseEqual(want.Find("w")->tensor()) &&
        sd.Find("b")->tensor().BitwiseEqual(want.Find("b")->tensor()) &&
        sd.Find("step")->as_int() == v) {
      return v;
    }
  }
  return 0;
}

TEST(CrashTest, EveryIoOperationOfAReplacingSaveFailedThenPowerCut) {
  for (int threads : {1, 3}) {
    SCOPED_TRACE("threads " + std::to_string(threads));
    FileSystemWriterOptions options;
    options.thread_count = threads;
    // A clean replacing save, counted.
    std::array<uint64_t, kNumStoreOps> counts{};
    {
      MemoryStore mem;
      FileSystemWriter first(&mem, "ck", options);
      ASSERT_TRUE(Save(State(1), first).ok());
      FaultStore counting(mem);
      FileSystemWriter second(&counting, "ck", options);
      ASSERT_TRUE(Save(State(2), second).ok());
      for (int op = 0; op < kNumStoreOps; ++op)
        counts[op] = counting.count(static_cast<StoreOp>(op));
    }
    int cases = 0, failed_saves = 0, new_after_cut = 0;
    for (int op = 0; op < kNumStoreOps; ++op) {
      for (uint64_t nth = 1; nth <= counts[op]; ++nth) {
        const std::string what =
            std::string(StoreOpName(static_cast<StoreOp>(op))) + " #" + std::to_string(nth);
        SCOPED_TRACE(what);
        MemoryStore mem;
        {
          FileSystemWriter first(&mem, "ck", options);
          ASSERT_TRUE(Save(State(1), first).ok());
        }
        Status saved;
        {
          FaultStore faulty(mem);
          faulty.AddFault({static_cast<StoreOp>(op), nth, UnavailableError("injected"), ""});
          FileSystemWriter second(&faulty, "ck", options);
          saved = Save(State(2), second).status();
        }
        if (!saved.ok()) ++failed_saves;
        const int before_cut = Version(mem);
        EXPECT_TRUE(before_cut == 1 || before_cut == 2) << before_cut;
        if (saved.ok()) {
          EXPECT_EQ(before_cut, 2);
        }
        mem.DropUnsyncedData();
        const int after_cut = Version(mem);
        EXPECT_TRUE(after_cut == 1 || after_cut == 2) << "after the power cut: " << after_cut;
        if (saved.ok()) {
          EXPECT_EQ(after_cut, 2) << "a save that reported success was lost";
        }
        if (after_cut == 2) ++new_after_cut;
        ++cases;
      }
    }
    EXPECT_GT(failed_saves, cases / 2);
    std::cout << "threads " << threads << ": " << cases << " I/O fault points, " << failed_saves
              << " failed saves, " << new_after_cut
              << " kept the new checkpoint after a power cut\n";
  }
}

}  // namespace
}  // namespace dcpp
