// The tuner's decisions as a group layer's checkpoint keeps them (safetensors metadata
// "tuteld.tuning", JSON), and what a resumed layer takes back from them.
//
// A decision holds where it was measured: the same layer (the checkpoint's spec, which the
// daemon compares before it resumes), the same candidates in the same order, and the same
// hardware (Backend::describe() of the rank's backend: the CPU's model and threads, or the GPU's).
// Anything else, including a record this build cannot read, is measured again: a decision only
// saves a few steps, and never decides whether the layer resumes. Whether the ranks restored the
// same decisions is the group's to check at creation (ExpertParallelOptions::tune.decided).
//
// {"version": 1, "measured_on": "cpu: 2 threads, <model>",
//  "candidates": ["r=0", "r=1 a=linear d=1"],
//  "decisions": [{"capacity_bucket": 64, "chosen": 1, "total_ns": [900, 400],
//                 "excluded": [false, false]}]}
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "tutel/core/status.hpp"
#include "tutel/graphs/exchange_tuner.hpp"

namespace tutel::daemon {

inline constexpr const char* kTuningKey = "tuteld.tuning";
// A record's text is at most this long (a full dictionary is a few KiB).
inline constexpr size_t kMaxTuningRecordBytes = 64 << 10;
// Buckets of a record: capacities 1 .. 2^40 give 41.
inline constexpr size_t kMaxTuningDecisions = 64;

struct TuningRecord {
  std::string measured_on;              // Backend::describe() where it was measured
  std::vector<std::string> candidates;  // ExchangeConfig::to_string(), in the tuner's order
  std::vector<graphs::TunerDecision> decisions;
};

std::string format_tuning_record(const TuningRecord& record);

// Reads a record strictly: the keys above and no others, version 1, each value of its type and
// in range (a count per candidate, indices within the candidates, totals >= 0). The error says
// what is wrong, naming `source`.
Result<TuningRecord> parse_tuning_record(std::string_view text, std::string_view source);

// The decisions a rank measured on `measured_on` with `candidates` restores from `record`, or why
// they do not hold there (another machine, other candidates, a decision the tuner refuses).
Result<std::vector<graphs::TunerDecision>> restorable_decisions(
    const TuningRecord& record, std::string_view measured_on,
    const std::vector<graphs::ExchangeConfig>& candidates);

}  // namespace tutel::daemon
