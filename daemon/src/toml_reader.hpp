// Reading a toml++ tree with messages a user can act on: every error is a
// Status::InvalidArgument of the form "<source>:<line>:<column>: <key path>: <message>", e.g.
// "tuteld.toml:12:9: tenant[1].max_layers: expected a positive integer, got -3". The schema
// that uses it (what keys exist, what they mean) lives in config.cpp; nothing here knows it.
//
// Internal to the daemon. This header includes <toml++/toml.h>, so it must never be included
// from a .cu file or from a public header: toml++ stays out of device code and behind
// config.hpp, and every includer must be built with the TOML_* settings of tutel_tomlplusplus
// (daemon/CMakeLists.txt), which only tutel_daemon_config links.
//
// Thread-safety: every function is reentrant; a Scope refers to a tree it does not own.
#pragma once

#include <toml++/toml.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <initializer_list>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tutel/core/status.hpp"

namespace tutel::daemon::toml_reader {

// As an upper bound: no upper bound ("a positive integer" rather than a range).
inline constexpr int64_t kMaxInt = std::numeric_limits<int64_t>::max();

// ---- Messages -----------------------------------------------------------------------------

// `s` in double quotes for a message: escaped, and cut after 60 characters.
std::string quote(std::string_view s);

// The shortest text that reads back to `v`, always with a '.' or an exponent (so TOML reads it
// back as a float); "nan", "inf", "-inf" otherwise.
std::string format_double(double v);

// "-3", "2.5", "\"abc\"", "true", or what the node is when it has no short value.
std::string describe(const toml::node& n);

// "<source>:<line>:<column>: <path>: <message>" (no position when toml++ has none, no path when
// `path` is empty).
Status located_error(std::string_view source, const toml::source_region& where,
                     std::string_view path, std::string_view message);

// ---- Walking the tree ---------------------------------------------------------------------

using KeyList = std::initializer_list<std::string_view>;

// One table being read: where it is, what it is called, and how to point at its keys.
class Scope {
 public:
  Scope(std::string_view source, const toml::table& table, std::string path, std::string label)
      : source_(source), table_(table), path_(std::move(path)), label_(std::move(label)) {}
  Scope child(const toml::table& table, std::string path, std::string label) const {
    return Scope(source_, table, std::move(path), std::move(label));
  }

  std::string key_path(std::string_view key) const {
    return path_.empty() ? std::string(key) : path_ + "." + std::string(key);
  }
  const toml::node* find(std::string_view key) const { return table_.get(key); }

  Status error_at(const toml::source_region& where, std::string_view path,
                  std::string_view message) const {
    return located_error(source_, where, path, message);
  }
  Status error(const toml::node& n, std::string_view key, std::string_view message) const {
    return error_at(n.source(), key_path(key), message);
  }
  // For an absent value, or a rule over several keys: points at the value when it is present,
  // else at the table.
  Status error_near(std::string_view key, std::string_view message) const {
    const toml::node* n = find(key);
    return error_at(n != nullptr ? n->source() : table_.source(),
                    key.empty() ? path_ : key_path(key), message);
  }
  Status missing(std::string_view key, std::string_view what) const {
    return error_near(key, "missing required key (" + std::string(what) + ") in " + label_);
  }

  // Refuses the first key in neither list, suggesting a known key within edit distance 2.
  Status check_keys(KeyList known, KeyList more = {}) const;
  Status check_keys(std::span<const std::string_view> known, KeyList more = {}) const;
  // Of the sub-table `sub` (whose keys are `own`): refuses a key of this table's (`outer`)
  // that it does not take itself. Written after the sub-table's header, a key belongs to that
  // table ([layer.optimizer] and then experts = 8), and this table then reports it missing
  // where the file plainly has it; called before the required keys are read, it says why.
  Status check_keys_taken_by(std::string_view sub, std::span<const std::string_view> own,
                             std::span<const std::string_view> outer) const;

 private:
  std::string_view source_;
  const toml::table& table_;
  std::string path_, label_;
};

// ---- Values -------------------------------------------------------------------------------
// Each get_* leaves `out` as it is when the key is absent (the caller's default), unless the
// key is required.

// "a positive integer", "an integer >= 0", "an integer in [lo, hi]", ...
std::string int_expectation(int64_t lo, int64_t hi);

template <typename T>
Status get_int(const Scope& s, std::string_view key, int64_t lo, int64_t hi, T& out,
               bool required = false) {
  const toml::node* n = s.find(key);
  if (n == nullptr) return required ? s.missing(key, int_expectation(lo, kMaxInt)) : Status::OK();
  const auto* v = n->as_integer();
  // Name the bound that was crossed: "a positive integer, got -3" says more than the range.
  const std::string expected =
      v != nullptr && v->get() < lo ? int_expectation(lo, kMaxInt) : int_expectation(lo, hi);
  if (v == nullptr || v->get() < lo || v->get() > hi)
    return s.error(*n, key, "expected " + expected + ", got " + describe(*n));
  out = static_cast<T>(v->get());
  return Status::OK();
}

// Integers are floats too: `lr = 1` means 1.0.
Status get_double(const Scope& s, std::string_view key, const std::function<bool(double)>& ok,
                  std::string_view expected, double& out);

// Judges the value narrowed to float, so lr = 1e-50 is not a positive learning rate.
Status get_float(const Scope& s, std::string_view key, const std::function<bool(float)>& ok,
                 std::string_view expected, float& out);

Status get_bool(const Scope& s, std::string_view key, bool& out);

// Refuses a string holding a NUL character.
Status get_string(const Scope& s, std::string_view key, std::string& out, bool required = false,
                  std::string_view expected = "a string");

// A string naming one of `choices`, mapped to its value by `parse`.
template <typename T, typename Parse>
Status get_enum(const Scope& s, std::string_view key, std::string_view choices, Parse parse,
                T& out) {
  const toml::node* n = s.find(key);
  if (n == nullptr) return Status::OK();
  std::optional<T> parsed;
  if (const auto* v = n->as_string()) parsed = parse(std::string_view(v->get()));
  if (!parsed)
    return s.error(*n, key, "expected one of " + std::string(choices) + ", got " + describe(*n));
  out = *parsed;
  return Status::OK();
}

// A byte count: an integer, or a string such as "64MiB".
Status get_bytes(const Scope& s, std::string_view key, uint64_t lo, uint64_t hi, uint64_t& out);

template <typename T>
Status get_int_array(const Scope& s, std::string_view key, int64_t lo, int64_t hi,
                     std::vector<T>& out) {
  const toml::node* n = s.find(key);
  if (n == nullptr) return Status::OK();
  const toml::array* a = n->as_array();
  if (a == nullptr) return s.error(*n, key, "expected an array of integers, got " + describe(*n));
  out.clear();
  for (size_t i = 0; i < a->size(); ++i) {
    const toml::node& e = *a->get(i);
    const auto* v = e.as_integer();
    if (v == nullptr || v->get() < lo || v->get() > hi)
      return s.error_at(e.source(), s.key_path(key) + "[" + std::to_string(i) + "]",
                        "expected " + int_expectation(lo, hi) + ", got " + describe(e));
    out.push_back(static_cast<T>(v->get()));
  }
  return Status::OK();
}

// A sub-table `key` (either [a.key] or key = { ... }); null when absent.
Result<const toml::table*> get_table(const Scope& s, std::string_view key, bool required,
                                     std::string_view what);

// Calls `each(scope, index)` on every table of the array of tables `key` ([[key]]).
Status for_each_table(const Scope& s, std::string_view key, std::string_view label,
                      const std::function<Status(const Scope&, size_t)>& each);

// A required name of 1 to 64 characters from A-Z a-z 0-9 _ . -; `what` is "a layer name", ...
Status get_name(const Scope& s, std::string_view key, std::string_view what, std::string& out);

// Relative paths are taken from the config file's directory, so the daemon does not depend
// on the directory it was started from. `base_dir` empty: `path` as written.
std::string resolve(const std::filesystem::path& base_dir, const std::string& path);

// A path, resolved against `base_dir`; when required, it must not be "".
Status get_path(const Scope& s, std::string_view key, const std::filesystem::path& base_dir,
                bool required, std::string& out);

}  // namespace tutel::daemon::toml_reader
