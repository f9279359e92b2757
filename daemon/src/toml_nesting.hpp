// How deep a TOML document nests, measured before toml++ parses it.
//
// Why: toml++ bounds the nesting of inline arrays and tables (TOML_MAX_NESTED_VALUES) but not of
// the tables that dotted keys and table headers create implicitly. A client's layer spec of one
// line `a.a.a. ... .a = 1` with 150 000 parts (300 KB, under the frame limit) made its parser and
// destructor recurse once per part and overflow the thread's stack: SIGSEGV, every tenant's
// layers and unsaved training lost. Layer specs and configs nest at most four deep.
#pragma once

#include <cstddef>
#include <string_view>

namespace tutel::daemon {

struct TomlNesting {
  size_t depth = 0;  // the deepest value: tables, dotted-key parts, arrays and inline tables
  size_t line = 0;   // 1-based line where that depth was first passed (0: not passed)
};

// The nesting of `text`, scanning at most until it passes `limit` (then `line` says where).
// Strings and comments are skipped as TOML defines them; malformed text never reads past the end
// and is measured as far as it goes (the parser then refuses it).
TomlNesting toml_nesting(std::string_view text, size_t limit);

}  // namespace tutel::daemon
