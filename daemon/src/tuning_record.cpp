#include "tuning_record.hpp"

#include <limits>
#include <optional>

#include <nlohmann/json.hpp>

#include "tutel/core/logging.hpp"
#include "tutel/ipc/json_body.hpp"

namespace tutel::daemon {
namespace {

using nlohmann::json;

constexpr int64_t kTuningRecordVersion = 1;
constexpr size_t kMaxMeasuredOnBytes = 512;

// `value` as an int64 in [low, high], or nullopt (a float, a bool, a string, out of range).
std::optional<int64_t> integer_in(const json& value, int64_t low, int64_t high) {
  const Result<int64_t> v = ipc::as_int(value, "a value");
  if (!v.ok() || *v < low || *v > high) return std::nullopt;
  return *v;
}

}  // namespace

std::string format_tuning_record(const TuningRecord& record) {
  json decisions = json::array();
  for (const graphs::TunerDecision& d : record.decisions)
    decisions.push_back({{"capacity_bucket", d.capacity_bucket},
                         {"chosen", d.chosen},
                         {"total_ns", d.total_ns},
                         {"excluded", d.excluded}});
  const json out{{"version", kTuningRecordVersion},
                 {"measured_on", record.measured_on},
                 {"candidates", record.candidates},
                 {"decisions", decisions}};
  // Replaces what is not UTF-8 (a processor name never is, but a record must always parse).
  return out.dump(-1, ' ', false, json::error_handler_t::replace);
}

Result<TuningRecord> parse_tuning_record(std::string_view text, std::string_view source) {
  const std::string where = std::string(source) + ": metadata '" + kTuningKey + "'";
  auto bad = [&](const std::string& why) { return Status::Corruption(where + " " + why); };
  if (text.size() > kMaxTuningRecordBytes)
    return bad("is " + std::to_string(text.size()) + " bytes, more than a tuner record's " +
               std::to_string(kMaxTuningRecordBytes));
  const json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return bad("is not JSON");
  if (!j.is_object()) return bad("is not a JSON object");
  for (const auto& [key, value] : j.items())
    if (key != "version" && key != "measured_on" && key != "candidates" && key != "decisions")
      return bad("has an unknown key '" + escape_text(std::string_view(key).substr(0, 64)) + "'");
  for (const char* key : {"version", "measured_on", "candidates", "decisions"})
    if (!j.contains(key)) return bad("has no '" + std::string(key) + "'");
  if (integer_in(j["version"], kTuningRecordVersion, kTuningRecordVersion) != kTuningRecordVersion)
    return bad("is not of version " + std::to_string(kTuningRecordVersion) + " (written by another tuteld)");
  TuningRecord record;
  if (!j["measured_on"].is_string() || j["measured_on"].get_ref<const std::string&>().size() > kMaxMeasuredOnBytes)
    return bad("'measured_on' is not a string of at most " + std::to_string(kMaxMeasuredOnBytes) + " bytes");
  record.measured_on = j["measured_on"].get<std::string>();
  const json& candidates = j["candidates"];
  if (!candidates.is_array() || candidates.size() < 2 || candidates.size() > graphs::TunerOptions::kMaxCandidates)
    return bad("'candidates' is not an array of 2 to " + std::to_string(graphs::TunerOptions::kMaxCandidates) +
               " names");
  for (const json& c : candidates) {
    if (!c.is_string() || c.get_ref<const std::string&>().size() > 64)
      return bad("'candidates' holds something other than a candidate's name");
    record.candidates.push_back(c.get<std::string>());
  }
  const size_t k = record.candidates.size();
  const json& decisions = j["decisions"];
  if (!decisions.is_array() || decisions.size() > kMaxTuningDecisions)
    return bad("'decisions' is not an array of at most " + std::to_string(kMaxTuningDecisions) + " decisions");
  for (size_t i = 0; i < decisions.size(); ++i) {
    const json& d = decisions[i];
    const std::string which = "decision " + std::to_string(i);
    if (!d.is_object() || d.size() != 4 || !d.contains("capacity_bucket") || !d.contains("chosen") ||
        !d.contains("total_ns") || !d.contains("excluded"))
      return bad(which + " is not an object of exactly capacity_bucket, chosen, total_ns and excluded");
    graphs::TunerDecision out;
    const std::optional<int64_t> bucket = integer_in(d["capacity_bucket"], 1, graphs::TunerOptions::kMaxBucket);
    if (!bucket) return bad(which + ": 'capacity_bucket' is not an integer in [1, 2^40]");
    out.capacity_bucket = *bucket;
    const std::optional<int64_t> chosen = integer_in(d["chosen"], 0, static_cast<int64_t>(k) - 1);
    if (!chosen) return bad(which + ": 'chosen' is not the index of one of the " + std::to_string(k) + " candidates");
    out.chosen = static_cast<size_t>(*chosen);
    const json& totals = d["total_ns"];
    const json& excluded = d["excluded"];
    if (!totals.is_array() || totals.size() != k)
      return bad(which + ": 'total_ns' is not an array of " + std::to_string(k) + " totals");
    if (!excluded.is_array() || excluded.size() != k)
      return bad(which + ": 'excluded' is not an array of " + std::to_string(k) + " booleans");
    for (const json& t : totals) {
      const std::optional<int64_t> ns = integer_in(t, 0, std::numeric_limits<int64_t>::max());
      if (!ns) return bad(which + ": 'total_ns' holds something other than a count of nanoseconds");
      out.total_ns.push_back(*ns);
    }
    for (const json& x : excluded) {
      if (!x.is_boolean()) return bad(which + ": 'excluded' holds something other than a boolean");
      out.excluded.push_back(x.get<bool>());
    }
    record.decisions.push_back(std::move(out));
  }
  return record;
}

Result<std::vector<graphs::TunerDecision>> restorable_decisions(
    const TuningRecord& record, std::string_view measured_on,
    const std::vector<graphs::ExchangeConfig>& candidates) {
  if (record.measured_on != measured_on)
    return Status::InvalidArgument("they were measured on \"" + escape_text(record.measured_on, '"') +
                                   "\", this rank runs on \"" + escape_text(measured_on, '"') + "\"");
  std::vector<std::string> names;
  for (const graphs::ExchangeConfig& c : candidates) names.push_back(c.to_string());
  if (record.candidates != names) {
    auto list = [](const std::vector<std::string>& v) {
      std::string out;
      for (const std::string& s : v) out += (out.empty() ? "" : ", ") + escape_text(s);
      return "[" + out + "]";
    };
    return Status::InvalidArgument("they chose among " + list(record.candidates) + ", this layer among " +
                                   list(names));
  }
  // What the tuner itself would refuse (a bucket that is not a power of two, given twice, a
  // choice the decision excluded), found here so that it never fails the layer's creation.
  graphs::TunerOptions check;
  check.candidates = candidates;
  check.decided = record.decisions;
  TUTEL_RETURN_IF_ERROR(graphs::ExchangeTuner::create(std::move(check)).status());
  return record.decisions;
}

}  // namespace tutel::daemon
