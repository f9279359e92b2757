#include "toml_nesting.hpp"

#include <vector>

namespace tutel::daemon {

TomlNesting toml_nesting(std::string_view text, size_t limit) {
  // Where the scan is: a line's start (top level), a key (of a key/value pair, top level or in an
  // inline table), a table header, the rest of a header's line, or a value.
  enum class Mode { kLineStart, kKey, kHeader, kAfterHeader, kValue };
  // An open array or inline table: the depth its elements or keys start from, and the value depth
  // it returns to.
  struct Frame {
    bool inline_table;
    size_t depth;
    size_t outer_value_depth;
  };
  std::vector<Frame> frames;  // at most limit + 1: passing the limit ends the scan
  TomlNesting result;
  const size_t n = text.size();
  size_t line = 1;
  size_t table_depth = 0;  // of the last table header
  size_t key_base = 0, key_parts = 1, value_depth = 0;
  bool array_header = false;
  Mode mode = Mode::kLineStart;
  // Records `depth`; true once it passes the limit.
  auto reach = [&](size_t depth) {
    if (depth > result.depth) result.depth = depth;
    if (depth > limit && result.line == 0) result.line = line;
    return depth > limit;
  };
  auto skip_comment = [&](size_t i) {
    while (i < n && text[i] != '\n') ++i;
    return i;  // at the newline, which the caller's mode handles
  };
  // The index after the string that opens at text[i] (a quote); multi-line forms only in values.
  auto skip_string = [&](size_t i, bool multiline_allowed) {
    const char quote = text[i];
    const bool basic = quote == '"';
    if (multiline_allowed && i + 2 < n && text[i + 1] == quote && text[i + 2] == quote) {
      size_t j = i + 3;
      while (j < n) {
        if (basic && text[j] == '\\' && j + 1 < n) {
          if (text[j + 1] == '\n') ++line;
          j += 2;
          continue;
        }
        if (text[j] == '\n') ++line;
        if (text[j] == quote && j + 2 < n && text[j + 1] == quote && text[j + 2] == quote) {
          j += 3;
          // A closing run of four or five quotes ends with the string's own one or two.
          for (int extra = 0; extra < 2 && j < n && text[j] == quote; ++extra) ++j;
          return j;
        }
        ++j;
      }
      return n;
    }
    size_t j = i + 1;
    while (j < n && text[j] != '\n') {
      if (basic && text[j] == '\\' && j + 1 < n && text[j + 1] != '\n') {
        j += 2;
        continue;
      }
      if (text[j] == quote) return j + 1;
      ++j;
    }
    return j;  // unterminated: the parser refuses it
  };

  size_t i = 0;
  while (i < n) {
    const char c = text[i];
    switch (mode) {
      case Mode::kLineStart:
        if (c == ' ' || c == '\t' || c == '\r') {
          ++i;
        } else if (c == '\n') {
          ++line;
          ++i;
        } else if (c == '#') {
          i = skip_comment(i);
        } else if (c == '[') {
          array_header = i + 1 < n && text[i + 1] == '[';
          i += array_header ? 2 : 1;
          key_parts = 1;
          mode = Mode::kHeader;
        } else {
          key_base = table_depth;
          key_parts = 1;
          mode = Mode::kKey;
        }
        break;
      case Mode::kKey:
      case Mode::kHeader:
        if (c == '"' || c == '\'') {
          i = skip_string(i, false);
        } else if (c == '#') {
          i = skip_comment(i);
        } else if (c == '.') {
          ++key_parts;
          if (reach((mode == Mode::kHeader ? 0 : key_base) + key_parts)) return result;
          ++i;
        } else if (c == '\n') {
          if (mode == Mode::kKey && !frames.empty()) {  // (malformed: inline tables are one line)
            ++line;
            ++i;
          } else {
            mode = Mode::kLineStart;  // malformed: a key or header without its end
          }
        } else if (mode == Mode::kHeader && c == ']') {
          // An array of tables nests one deeper: the array, then its element.
          table_depth = key_parts + (array_header ? 1 : 0);
          if (reach(table_depth)) return result;
          mode = Mode::kAfterHeader;
          ++i;
        } else if (mode == Mode::kKey && c == '=') {
          value_depth = key_base + key_parts;
          if (reach(value_depth)) return result;
          mode = Mode::kValue;
          ++i;
        } else if (mode == Mode::kKey && c == '}') {
          mode = Mode::kValue;  // an empty inline table: the value scan closes it
        } else {
          ++i;
        }
        break;
      case Mode::kAfterHeader:
        if (c == '\n') {
          mode = Mode::kLineStart;
        } else {
          ++i;
        }
        break;
      case Mode::kValue:
        if (c == '"' || c == '\'') {
          i = skip_string(i, true);
        } else if (c == '#') {
          i = skip_comment(i);
        } else if (c == '\n') {
          if (frames.empty()) {
            mode = Mode::kLineStart;
          } else {  // a multi-line array
            ++line;
            ++i;
          }
        } else if (c == '[') {
          // The array is the value at value_depth; its elements lie one deeper.
          frames.push_back({false, value_depth + 1, value_depth});
          ++value_depth;
          if (reach(value_depth)) return result;
          ++i;
        } else if (c == '{') {
          // The inline table is the value at value_depth; its keys lie below it as a table's do.
          frames.push_back({true, value_depth, value_depth});
          key_base = value_depth;
          key_parts = 1;
          mode = Mode::kKey;
          ++i;
        } else if (c == ']' || c == '}') {
          if (!frames.empty() && frames.back().inline_table == (c == '}')) {
            value_depth = frames.back().outer_value_depth;
            frames.pop_back();
          }
          ++i;
        } else if (c == ',') {
          if (!frames.empty() && frames.back().inline_table) {
            key_base = frames.back().depth;
            key_parts = 1;
            mode = Mode::kKey;
          }
          ++i;
        } else {
          ++i;
        }
        break;
    }
  }
  return result;
}

}  // namespace tutel::daemon
