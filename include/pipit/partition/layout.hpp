#pragma once
// layout: a partition from a string, in the language of Megatron-LM's
// pipeline_model_parallel_layout: `E` the input embedding, `t` a transformer layer, `L` the
// output layer with the loss, `|` between consecutive virtual stages, `X*n` repeats an item or a
// parenthesised group n times; spaces and commas are cosmetic. Examples:
//   "E t t t | t t t t | t t t t | t t L"    four stages, the ends one layer lighter
//   "E t*3 | t*4 | t*4 | t*3 L"              the same
//   "E t*2 | (t*3 |)*2 t L"                  a group repeated
//   "t*4 | t*4"                              neither E nor L: both sharded (vocabulary parallel)
// E must be the first item of the first stage and L the last item of the last, both or neither.
// Stages are virtual stages in pipeline order (see partition.hpp). A syntax error names the
// column (1-based) and draws a caret under it.

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/partition/partition.hpp"

namespace pipit::partition {

namespace impl {

struct layout_token {
  char kind = 't';  // 'E', 't', 'L' or '|'
  int column = 0;   // 1-based column of the character it came from
};

[[noreturn]] inline void layout_error(std::string_view text, int column, std::string_view what) {
  std::string caret(static_cast<std::size_t>(column > 0 ? column - 1 : 0), ' ');
  fail("pipit: layout: ", what, " at column ", column, "\n  ", text, "\n  ", caret, "^");
}

// Recursive descent over `text` from `pos`; appends the expanded tokens. Returns at the end of
// the text or at a ')' (left for the caller).
constexpr void parse_layout_sequence(std::string_view text, std::size_t& pos, int depth,
                                     std::vector<layout_token>& out) {
  constexpr std::size_t max_tokens = 1u << 20;
  while (pos < text.size()) {
    const char c = text[pos];
    const int column = static_cast<int>(pos) + 1;
    if (c == ' ' || c == ',' || c == '\t') {
      ++pos;
      continue;
    }
    if (c == ')') {
      if (depth == 0) layout_error(text, column, "unexpected ')' without a matching '('");
      return;
    }
    if (c == '*') layout_error(text, column, "'*' must follow E, t, L or a ')'");
    const std::size_t first = out.size();
    bool repeatable = true;
    if (c == 'E' || c == 't' || c == 'L') {
      out.push_back({c, column});
      ++pos;
    } else if (c == '|') {
      out.push_back({c, column});
      ++pos;
      repeatable = false;
    } else if (c == '(') {
      ++pos;
      parse_layout_sequence(text, pos, depth + 1, out);
      if (pos >= text.size()) layout_error(text, column, "unclosed '('");
      ++pos;  // the ')'
    } else {
      layout_error(text, column,
                   pipit::detail::concat("unexpected '", c,
                                         "' (expected E, t, L, |, a group in ( ) or *count)"));
    }
    // An optional repetition: spaces, '*', spaces, a count.
    std::size_t look = pos;
    while (look < text.size() && text[look] == ' ') ++look;
    if (look < text.size() && text[look] == '*') {
      const int star = static_cast<int>(look) + 1;
      if (!repeatable) layout_error(text, star, "'*' must follow E, t, L or a ')'");
      pos = look + 1;
      while (pos < text.size() && text[pos] == ' ') ++pos;
      const int count_column = static_cast<int>(pos) + 1;
      if (pos >= text.size() || text[pos] < '0' || text[pos] > '9')
        layout_error(text, count_column, "expected a repetition count after '*'");
      long long count = 0;
      while (pos < text.size() && text[pos] >= '0' && text[pos] <= '9') {
        count = count * 10 + (text[pos] - '0');
        if (count > static_cast<long long>(max_tokens))
          layout_error(text, count_column, "repetition count too large");
        ++pos;
      }
      if (count < 1) layout_error(text, count_column, "repetition count must be >= 1");
      const std::size_t last = out.size();
      if ((last - first) * static_cast<std::size_t>(count) > max_tokens)
        layout_error(text, count_column, "layout too large");
      for (long long k = 1; k < count; ++k)
        for (std::size_t i = first; i < last; ++i) {
          const layout_token copy = out[i];
          out.push_back(copy);
        }
    }
  }
}

}  // namespace impl

// Parses `text` into a partition of the pipeline `pl`. When `layers` >= 0 the layout must hold
// exactly that many transformer layers. Throws pipit::error with the column of a syntax error, or
// naming the counts that do not match.
constexpr partition layout(std::string_view text, const pipeline& pl, int layers = -1) {
  check(pl);
  std::vector<impl::layout_token> tokens;
  std::size_t pos = 0;
  impl::parse_layout_sequence(text, pos, 0, tokens);

  partition p{pl, false, {}};
  p.stages.push_back({});
  int e_count = 0, l_count = 0, next_layer = 0;
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    const auto& tok = tokens[i];
    stage& st = p.stages.back();
    switch (tok.kind) {
      case '|':
        p.stages.push_back({next_layer, 0, false, false});
        break;
      case 't':
        if (st.output)
          impl::layout_error(text, tok.column, "a layer after L: L must be the last item");
        ++st.layers;
        ++next_layer;
        break;
      case 'E':
        if (++e_count > 1) impl::layout_error(text, tok.column, "a second E");
        if (i != 0)
          impl::layout_error(text, tok.column, "E must be the first item of the first stage");
        st.embedding = true;
        break;
      case 'L':
        if (++l_count > 1) impl::layout_error(text, tok.column, "a second L");
        if (i + 1 != tokens.size())
          impl::layout_error(text, tok.column, "L must be the last item of the last stage");
        st.output = true;
        break;
      default:
        break;
    }
  }
  if (e_count != l_count)
    impl::layout_error(text, e_count == 0 ? 1 : static_cast<int>(text.size()) + 1,
                       e_count == 0 ? "L without E (give both, or neither for vocabulary "
                                      "parallelism)"
                                    : "E without L (give both, or neither for vocabulary "
                                      "parallelism)");
  p.vocab_parallel = e_count == 0;
  if (p.virtual_stages() != pl.virtual_stages())
    fail("pipit: layout '", text, "' has ", p.virtual_stages(), " stages but the pipeline has ",
         pl.virtual_stages(), " (ranks ", pl.ranks, " x chunks ", pl.chunks, ")");
  if (layers >= 0 && p.layer_count() != layers)
    fail("pipit: layout '", text, "' has ", p.layer_count(),
         " transformer layers (t) but the model has ", layers);
  check(p);
  return p;
}

}  // namespace pipit::partition
