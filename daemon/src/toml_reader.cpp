// The toolkit of toml_reader.hpp: located messages and typed reads of a toml++ tree.
#include "toml_reader.hpp"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdio>

#include "tutel/core/logging.hpp"

namespace tutel::daemon::toml_reader {

namespace fs = std::filesystem;

// ---- Messages -----------------------------------------------------------------------------

std::string quote(std::string_view s) { return quote_text(s, '"', 60); }

std::string format_double(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  std::string s(buf, r.ptr);
  // TOML needs a '.' or an exponent to read a float back as a float.
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

std::string describe(const toml::node& n) {
  switch (n.type()) {
    case toml::node_type::integer:
      return std::to_string(n.as_integer()->get());
    case toml::node_type::floating_point:
      return format_double(n.as_floating_point()->get());
    case toml::node_type::string:
      return quote(n.as_string()->get());
    case toml::node_type::boolean:
      return n.as_boolean()->get() ? "true" : "false";
    case toml::node_type::array:
      return "an array";
    case toml::node_type::table:
      return "a table";
    case toml::node_type::date:
      return "a date";
    case toml::node_type::time:
      return "a time";
    case toml::node_type::date_time:
      return "a date-time";
    default:
      return "nothing";
  }
}

Status located_error(std::string_view source, const toml::source_region& where,
                     std::string_view path, std::string_view message) {
  std::string m(source);
  // Appended piece by piece: GCC 12 warns (-Wrestrict, wrongly) on ":" + std::to_string(...).
  if (where.begin.line > 0) {
    m += ':';
    m += std::to_string(where.begin.line);
    m += ':';
    m += std::to_string(where.begin.column);
  }
  m += ": ";
  if (!path.empty()) {
    m += path;
    m += ": ";
  }
  m += message;
  return Status::InvalidArgument(std::move(m));
}

// ---- Walking the tree ---------------------------------------------------------------------

namespace {

size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = up;
    }
  }
  return row[b.size()];
}

}  // namespace

Status Scope::check_keys(KeyList known, KeyList more) const {
  return check_keys(std::span<const std::string_view>(known.begin(), known.size()), more);
}

Status Scope::check_keys_taken_by(std::string_view sub, std::span<const std::string_view> own,
                                  std::span<const std::string_view> outer) const {
  const toml::node* n = find(sub);
  const toml::table* t = n != nullptr ? n->as_table() : nullptr;
  if (t == nullptr) return Status::OK();
  for (auto&& [key, value] : *t) {
    const std::string_view name = key.str();
    const auto is = [&](std::string_view k) { return k == name; };
    if (std::any_of(own.begin(), own.end(), is) || !std::any_of(outer.begin(), outer.end(), is)) continue;
    return error_at(key.source(), key_path(sub) + "." + std::string(name),
                    std::string(name) + " is a key of " + label_ + ", but written after the [" + key_path(sub) +
                        "] header it belongs to that table; write " + label_ + "'s own keys above the header");
  }
  return Status::OK();
}

Status Scope::check_keys(std::span<const std::string_view> known, KeyList more) const {
  for (auto&& [key, value] : table_) {
    const std::string_view name = key.str();
    const auto is = [&](std::string_view k) { return k == name; };
    if (std::any_of(known.begin(), known.end(), is) || std::any_of(more.begin(), more.end(), is))
      continue;
    std::string_view best;
    size_t best_distance = 3;  // suggest only within edit distance 2
    for (std::span<const std::string_view> list : {known, std::span<const std::string_view>(more.begin(), more.size())})
      for (std::string_view k : list)
        if (const size_t d = edit_distance(name, k); d < best_distance) best = k, best_distance = d;
    std::string m = "unknown key in " + label_;
    if (!best.empty()) m += "; did you mean '" + std::string(best) + "'?";
    return error_at(key.source(), key_path(name), m);
  }
  return Status::OK();
}

// ---- Values -------------------------------------------------------------------------------

std::string int_expectation(int64_t lo, int64_t hi) {
  if (hi == kMaxInt) {
    if (lo == 1) return "a positive integer";
    if (lo == 0) return "an integer >= 0";
    return "an integer >= " + std::to_string(lo);
  }
  return "an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]";
}

Status get_double(const Scope& s, std::string_view key, const std::function<bool(double)>& ok,
                  std::string_view expected, double& out) {
  const toml::node* n = s.find(key);
  if (n == nullptr) return Status::OK();
  std::optional<double> v;
  if (const auto* f = n->as_floating_point()) v = f->get();
  if (const auto* i = n->as_integer()) v = static_cast<double>(i->get());
  if (!v || !ok(*v))
    return s.error(*n, key, "expected " + std::string(expected) + ", got " + describe(*n));
  out = *v;
  return Status::OK();
}

namespace {

// Beyond float's range a double becomes an infinity (a plain cast would be undefined).
float narrow(double d) {
  constexpr double kMax = std::numeric_limits<float>::max();
  if (d > kMax) return std::numeric_limits<float>::infinity();
  if (d < -kMax) return -std::numeric_limits<float>::infinity();
  return static_cast<float>(d);
}

}  // namespace

Status get_float(const Scope& s, std::string_view key, const std::function<bool(float)>& ok,
                 std::string_view expected, float& out) {
  double v = out;
  TUTEL_RETURN_IF_ERROR(get_double(
      s, key, [&](double d) { return ok(narrow(d)); }, expected, v));
  out = narrow(v);
  return Status::OK();
}

Status get_bool(const Scope& s, std::string_view key, bool& out) {
  const toml::node* n = s.find(key);
  if (n == nullptr) return Status::OK();
  const auto* v = n->as_boolean();
  if (v == nullptr) return s.error(*n, key, "expected true or false, got " + describe(*n));
  out = v->get();
  return Status::OK();
}

Status get_string(const Scope& s, std::string_view key, std::string& out, bool required,
                  std::string_view expected) {
  const toml::node* n = s.find(key);
  if (n == nullptr) return required ? s.missing(key, expected) : Status::OK();
  const auto* v = n->as_string();
  if (v == nullptr)
    return s.error(*n, key, "expected " + std::string(expected) + ", got " + describe(*n));
  if (v->get().find('\0') != std::string::npos)
    return s.error(*n, key, "the string holds a NUL character");
  out = v->get();
  return Status::OK();
}

namespace {

std::optional<uint64_t> parse_size(std::string_view text) {
  size_t i = 0;
  uint64_t value = 0;
  while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
    if (value > (std::numeric_limits<uint64_t>::max() - 9) / 10) return std::nullopt;
    value = value * 10 + static_cast<uint64_t>(text[i++] - '0');
  }
  if (i == 0) return std::nullopt;
  while (i < text.size() && text[i] == ' ') ++i;
  std::string unit(text.substr(i));
  for (char& c : unit) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  int shift = 0;
  if (unit == "kib")
    shift = 10;
  else if (unit == "mib")
    shift = 20;
  else if (unit == "gib")
    shift = 30;
  else if (unit == "tib")
    shift = 40;
  else if (!unit.empty() && unit != "b")
    return std::nullopt;
  if (value > (std::numeric_limits<uint64_t>::max() >> shift)) return std::nullopt;
  return value << shift;
}

std::string size_name(uint64_t bytes) {
  for (auto [shift, unit] :
       {std::pair{40, "TiB"}, std::pair{30, "GiB"}, std::pair{20, "MiB"}, std::pair{10, "KiB"}})
    if (bytes >= (uint64_t{1} << shift) && bytes % (uint64_t{1} << shift) == 0)
      return std::to_string(bytes >> shift) + unit;
  return std::to_string(bytes);
}

}  // namespace

Status get_bytes(const Scope& s, std::string_view key, uint64_t lo, uint64_t hi, uint64_t& out) {
  const toml::node* n = s.find(key);
  if (n == nullptr) return Status::OK();
  std::optional<uint64_t> v;
  if (const auto* i = n->as_integer(); i != nullptr && i->get() >= 0)
    v = static_cast<uint64_t>(i->get());
  if (const auto* str = n->as_string()) v = parse_size(str->get());
  if (!v || *v < lo || *v > hi)
    return s.error(*n, key,
                   "expected a byte count from " + size_name(lo) + " to " + size_name(hi) +
                       ", as an integer or a string such as \"64MiB\" (units B, KiB, MiB, GiB, "
                       "TiB), got " +
                       describe(*n));
  out = *v;
  return Status::OK();
}

Result<const toml::table*> get_table(const Scope& s, std::string_view key, bool required,
                                     std::string_view what) {
  const toml::node* n = s.find(key);
  if (n == nullptr) {
    if (!required) return static_cast<const toml::table*>(nullptr);
    return s.error_near(key, "missing required table " + std::string(what));
  }
  if (const toml::table* t = n->as_table()) return t;
  return s.error(*n, key, "expected a table " + std::string(what) + ", got " + describe(*n));
}

Status for_each_table(const Scope& s, std::string_view key, std::string_view label,
                      const std::function<Status(const Scope&, size_t)>& each) {
  const toml::node* n = s.find(key);
  if (n == nullptr) return Status::OK();
  const toml::array* a = n->as_array();
  if (a == nullptr)
    return s.error(
        *n, key, "expected an array of tables ([[" + std::string(key) + "]]), got " + describe(*n));
  for (size_t i = 0; i < a->size(); ++i) {
    const std::string path = s.key_path(key) + "[" + std::to_string(i) + "]";
    const toml::node& e = *a->get(i);
    const toml::table* t = e.as_table();
    if (t == nullptr) return s.error_at(e.source(), path, "expected a table, got " + describe(e));
    TUTEL_RETURN_IF_ERROR(each(s.child(*t, path, std::string(label)), i));
  }
  return Status::OK();
}

namespace {

// Names become path components (state_dir/<tenant>/<layer>.safetensors): "." and ".." would
// name the directory above, or another tenant's.
bool valid_name(std::string_view name) {
  if (name.empty() || name.size() > 64 || name == "." || name == "..") return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c == '.' || c == '-';
  });
}

}  // namespace

Status get_name(const Scope& s, std::string_view key, std::string_view what, std::string& out) {
  TUTEL_RETURN_IF_ERROR(get_string(s, key, out, /*required=*/true, what));
  if (!valid_name(out))
    return s.error(*s.find(key), key,
                   "expected " + std::string(what) +
                       " of 1 to 64 characters from A-Z a-z 0-9 _ . - (not \".\" or \"..\"), got " + quote(out));
  return Status::OK();
}

std::string resolve(const fs::path& base_dir, const std::string& path) {
  if (base_dir.empty()) return path;
  const fs::path p(path);
  return (p.is_absolute() ? p : base_dir / p).lexically_normal().string();
}

Status get_path(const Scope& s, std::string_view key, const fs::path& base_dir, bool required,
                std::string& out) {
  const bool present = s.find(key) != nullptr;
  TUTEL_RETURN_IF_ERROR(get_string(s, key, out, required, "a path"));
  if (present && required && out.empty()) return s.error_near(key, "expected a path, got \"\"");
  if (!out.empty()) out = resolve(base_dir, out);
  return Status::OK();
}

}  // namespace tutel::daemon::toml_reader
