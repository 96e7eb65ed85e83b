// The render layer: ASCII, SVG and Chrome-trace views of simulated GPipe and 1F1B plans (and a
// hand-made two-chunk plan), checked against the simulator's own timeline.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <map>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "pipit/render/ascii.hpp"
#include "pipit/render/chrome_trace.hpp"
#include "pipit/render/svg.hpp"
#include "pipit/schedule/gpipe.hpp"
#include "pipit/schedule/lower.hpp"
#include "pipit/schedule/one_f_one_b.hpp"
#include "pipit/sim/simulate.hpp"

using namespace pipit::schedule;
using pipit::render::ascii_timeline;
using pipit::render::chrome_trace;
using pipit::render::svg_options;
using pipit::render::svg_timeline;
using pipit::sim::costs;
using pipit::sim::simulate;

namespace {

const costs unit_costs{.f = 1.0, .b = 1.0, .w = 1.0};  // F 1, combined BW 2

std::size_t compute_count(const plan& p) {
  std::size_t n = 0;
  for (const auto& r : p.ranks)
    for (const action& a : r) n += is_compute(a.kind) ? 1 : 0;
  return n;
}

std::size_t count(std::string_view text, std::string_view what) {
  std::size_t n = 0;
  for (auto at = text.find(what); at != std::string_view::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

// The chart part of each "rank r |...|" line, in rank order.
std::vector<std::string> ascii_rows(const std::string& text) {
  std::vector<std::string> rows;
  for (const auto& line : lines_of(text))
    if (line.rfind("rank ", 0) == 0) {
      const auto open = line.find('|'), close = line.rfind('|');
      REQUIRE(open != std::string::npos);
      REQUIRE(close > open);
      rows.push_back(line.substr(open + 1, close - open - 1));
    }
  return rows;
}

// A two-chunk plan on two ranks (looped placement: stages 0 and 2 on rank 0, 1 and 3 on rank 1),
// made by hand because the interleaved generators are not used here.
plan two_chunk_plan() {
  plan p{"hand", shape{2, 1, 2}, placement::looped, false, false, {}};
  p.ranks = {{make_action(op::forward, 0, 0), make_action(op::forward, 2, 0),
              make_action(op::backward, 2, 0), make_action(op::backward, 0, 0)},
             {make_action(op::forward, 1, 0), make_action(op::forward, 3, 0),
              make_action(op::backward, 3, 0), make_action(op::backward, 1, 0)}};
  return p;
}

// ---- a small validating JSON reader (RFC 8259 grammar; \u escapes decoded for ASCII only) ----

struct json {
  enum kind_t { null, boolean, number, string, array, object } kind = null;
  double num = 0;
  bool b = false;
  std::string str;
  std::vector<json> items;
  // Object members as parallel lists: a pair<string, json> would need json complete here.
  std::vector<std::string> keys;
  std::vector<json> values;

  const json* get(std::string_view key) const {
    for (std::size_t k = 0; k < keys.size(); ++k)
      if (keys[k] == key) return &values[k];
    return nullptr;
  }
};

struct json_reader {
  std::string_view s;
  std::size_t i = 0;
  std::string error{};

  bool fail(const char* why) {
    if (error.empty()) error = std::string(why) + " at offset " + std::to_string(i);
    return false;
  }
  void ws() {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\n' || s[i] == '\r' || s[i] == '\t')) ++i;
  }
  bool literal(std::string_view word) {
    if (s.substr(i, word.size()) != word) return fail("bad literal");
    i += word.size();
    return true;
  }
  bool read_string(std::string& out) {
    if (i >= s.size() || s[i] != '"') return fail("expected a string");
    ++i;
    while (i < s.size() && s[i] != '"') {
      const char c = s[i++];
      if (static_cast<unsigned char>(c) < 0x20) return fail("raw control character in a string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i >= s.size()) return fail("unterminated escape");
      const char e = s[i++];
      switch (e) {
        case '"':
          out += '"';
          break;
        case '\\':
          out += '\\';
          break;
        case '/':
          out += '/';
          break;
        case 'b':
          out += '\b';
          break;
        case 'f':
          out += '\f';
          break;
        case 'n':
          out += '\n';
          break;
        case 'r':
          out += '\r';
          break;
        case 't':
          out += '\t';
          break;
        case 'u': {
          if (i + 4 > s.size()) return fail("short \\u escape");
          const std::string hex(s.substr(i, 4));
          if (hex.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos)
            return fail("bad \\u escape");
          const long v = std::strtol(hex.c_str(), nullptr, 16);
          if (v >= 0x80) return fail("non-ASCII \\u escape (not expected from pipit)");
          out += static_cast<char>(v);
          i += 4;
          break;
        }
        default:
          return fail("unknown escape");
      }
    }
    if (i >= s.size()) return fail("unterminated string");
    ++i;
    return true;
  }
  bool read_number(double& out) {
    const std::size_t b = i;
    if (i < s.size() && s[i] == '-') ++i;
    if (i < s.size() && s[i] == '0') {
      ++i;
    } else {
      if (i >= s.size() || s[i] < '1' || s[i] > '9') return fail("bad number");
      while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
    }
    if (i < s.size() && s[i] == '.') {
      ++i;
      if (i >= s.size() || s[i] < '0' || s[i] > '9') return fail("no digit after the point");
      while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
    }
    if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
      ++i;
      if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
      if (i >= s.size() || s[i] < '0' || s[i] > '9') return fail("bad exponent");
      while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i;
    }
    out = std::strtod(std::string(s.substr(b, i - b)).c_str(), nullptr);
    return true;
  }
  bool value(json& v, int depth = 0) {
    if (depth > 64) return fail("too deep");
    ws();
    if (i >= s.size()) return fail("unexpected end");
    const char c = s[i];
    if (c == '{') {
      v.kind = json::object;
      ++i;
      ws();
      if (i < s.size() && s[i] == '}') return ++i, true;
      for (;;) {
        ws();
        std::string key;
        if (!read_string(key)) return false;  // a trailing comma fails here
        ws();
        if (i >= s.size() || s[i] != ':') return fail("expected ':'");
        ++i;
        json member;
        if (!value(member, depth + 1)) return false;
        v.keys.push_back(std::move(key));
        v.values.push_back(std::move(member));
        ws();
        if (i < s.size() && s[i] == ',') {
          ++i;
          continue;
        }
        if (i < s.size() && s[i] == '}') return ++i, true;
        return fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      v.kind = json::array;
      ++i;
      ws();
      if (i < s.size() && s[i] == ']') return ++i, true;
      for (;;) {
        json item;
        if (!value(item, depth + 1)) return false;  // a trailing comma fails here
        v.items.push_back(std::move(item));
        ws();
        if (i < s.size() && s[i] == ',') {
          ++i;
          continue;
        }
        if (i < s.size() && s[i] == ']') return ++i, true;
        return fail("expected ',' or ']'");
      }
    }
    if (c == '"') return v.kind = json::string, read_string(v.str);
    if (c == 't') return v.kind = json::boolean, v.b = true, literal("true");
    if (c == 'f') return v.kind = json::boolean, literal("false");
    if (c == 'n') return literal("null");
    v.kind = json::number;
    return read_number(v.num);
  }
};

// Parses a whole document; fails the test with the reader's message when it is not JSON.
json parse_json(std::string_view text) {
  json_reader rd{text};
  json v;
  bool ok = rd.value(v);
  rd.ws();
  if (ok && rd.i != text.size()) ok = rd.fail("trailing characters");
  INFO(rd.error);
  REQUIRE(ok);
  return v;
}

bool is_json(std::string_view text) {
  json_reader rd{text};
  json v;
  if (!rd.value(v)) return false;
  rd.ws();
  return rd.i == text.size();
}

// ---- a small XML tag-balance check: every element closed in order, one root ----

bool tags_balanced(std::string_view doc, std::string& why) {
  std::vector<std::string> open;
  int roots = 0;
  for (std::size_t i = doc.find('<'); i != std::string_view::npos; i = doc.find('<', i + 1)) {
    const auto end = doc.find('>', i);
    if (end == std::string_view::npos) return why = "unterminated tag", false;
    const std::string_view tag = doc.substr(i + 1, end - i - 1);
    if (tag.empty()) return why = "empty tag", false;
    if (tag.front() == '?' || tag.front() == '!') continue;
    if (tag.front() == '/') {
      const std::string name(tag.substr(1));
      if (open.empty() || open.back() != name) return why = "mismatched </" + name + ">", false;
      open.pop_back();
      continue;
    }
    if (open.empty()) ++roots;
    if (tag.back() == '/') continue;  // self-closing
    open.emplace_back(tag.substr(0, tag.find_first_of(" \n\t")));
  }
  if (!open.empty()) return why = "unclosed <" + open.back() + ">", false;
  if (roots != 1) return why = std::to_string(roots) + " root elements", false;
  return true;
}

// The value of attribute `name` in the first tag containing `marker`.
double attribute(std::string_view doc, std::string_view marker, std::string_view name) {
  const auto at = doc.find(marker);
  REQUIRE(at != std::string_view::npos);
  const auto tag_begin = doc.rfind('<', at), tag_end = doc.find('>', at);
  const std::string key = " " + std::string(name) + "=\"";
  const auto a = doc.find(key, tag_begin);
  REQUIRE(a < tag_end);
  return std::strtod(std::string(doc.substr(a + key.size())).c_str(), nullptr);
}

}  // namespace

// ---- ASCII ----------------------------------------------------------------------------------

TEST_CASE("ascii timeline has one row per rank and marks idle exactly where the simulator does",
          "[render][ascii]") {
  for (const plan& p : {make_plan<one_f_one_b>(shape{4, 4, 1}), make_plan<gpipe>(shape{4, 4, 1}),
                        make_plan<one_f_one_b>(shape{3, 7, 1}), two_chunk_plan()}) {
    INFO(p.schedule << " " << to_string(p.shp));
    const auto r = simulate(p, unit_costs);
    const double tpc = p.shp.chunks == 1 ? 1.0 : 0.5;  // chunk passes take 1/chunks
    const std::string text = ascii_timeline(r, p, tpc);
    INFO(text);
    const auto rows = ascii_rows(text);
    REQUIRE(static_cast<int>(rows.size()) == p.rank_count());
    for (int rank = 0; rank < p.rank_count(); ++rank) {
      const std::string& row = rows[static_cast<std::size_t>(rank)];
      REQUIRE(row.size() == static_cast<std::size_t>(std::llround(r.makespan / tpc)));
      for (std::size_t c = 0; c < row.size(); ++c) {
        const double mid = (static_cast<double>(c) + 0.5) * tpc;
        bool busy = false;
        for (const auto& t : r.timeline[static_cast<std::size_t>(rank)])
          busy = busy || (t.start <= mid && mid < t.end);
        INFO("rank " << rank << " column " << c);
        CHECK((row[c] != '.') == busy);
      }
    }
  }
}

TEST_CASE("ascii timeline of 1F1B p=4 m=4 starts rank r after r idle columns", "[render][ascii]") {
  const plan p = make_plan<one_f_one_b>(shape{4, 4, 1});
  const auto r = simulate(p, costs{.f = 1.0, .b = 2.0, .w = 0.0});
  const std::string text = ascii_timeline(r, p, 1);
  INFO(text);
  const auto rows = ascii_rows(text);
  REQUIRE(rows.size() == 4);
  for (std::size_t rank = 0; rank < 4; ++rank)
    CHECK(rows[rank].substr(0, rank + 1) == std::string(rank, '.') + "F");
  // Rank 3 runs F0 then its backward at once, then F1: "F", "X0" over BW's two columns, "F".
  CHECK(rows[3].substr(3, 4) == "FX0F");
  // The last rank finishes first in 1F1B: its row ends with the drain of the others, idle.
  CHECK(rows[3].back() == '.');
  CHECK(rows[0].back() != '.');
}

TEST_CASE("ascii timeline labels microbatches, axis and legend", "[render][ascii]") {
  const plan p = make_plan<one_f_one_b>(shape{4, 4, 1});
  const auto r = simulate(p, unit_costs);
  const std::string text = ascii_timeline(r, p, 0.5);  // F takes two columns: "F0", BW four
  INFO(text);
  const auto rows = ascii_rows(text);
  CHECK(rows[0].rfind("F0F1F2F3.", 0) == 0);
  CHECK(rows[3].rfind("......F0X0--F1X1--", 0) == 0);
  CHECK(text.find("1f1b {stages=4, microbatches=4, chunks=1}") != std::string::npos);
  CHECK(text.find("makespan 21") != std::string::npos);
  const auto lines = lines_of(text);
  bool axis = false;
  for (const auto& l : lines) axis = axis || (l.rfind("time", 0) == 0 && l.find('+') != l.npos);
  CHECK(axis);
  CHECK(text.find("legend:") != std::string::npos);
  CHECK(text.find("F = forward") != std::string::npos);
  CHECK(text.find("X = backward") != std::string::npos);
  CHECK(text.find(". = idle") != std::string::npos);
  CHECK(text.find("B = ") == std::string::npos);  // only the kinds that appear
  // One chunk: no lower-case pass letters anywhere in the chart.
  for (const auto& row : rows)
    for (const char c : row) CHECK_FALSE((c >= 'a' && c <= 'z'));
}

TEST_CASE("ascii timeline marks chunk 1 in lower case and says so", "[render][ascii]") {
  const plan p = two_chunk_plan();
  const auto r = simulate(p, unit_costs);
  const std::string text = ascii_timeline(r, p, 0.25);
  INFO(text);
  const auto rows = ascii_rows(text);
  REQUIRE(rows.size() == 2);
  // Rank 0: F0.0 (chunk 0) at [0, 0.5), F2.0 (chunk 1) at [1, 1.5).
  CHECK(rows[0].rfind("F0..f0", 0) == 0);
  CHECK(rows[1].find("x0") != std::string::npos);
  CHECK(text.find("lower case") != std::string::npos);
  CHECK(text.find("chunk 1") != std::string::npos);
}

TEST_CASE("ascii timeline picks a column width that fits about 120 characters", "[render][ascii]") {
  for (const shape s : {shape{4, 4, 1}, shape{8, 32, 1}, shape{16, 64, 1}, shape{2, 1, 1}}) {
    const plan p = make_plan<one_f_one_b>(s);
    const auto r = simulate(p, costs{.f = 1.0, .b = 1.5, .w = 0.5});
    const std::string text = ascii_timeline(r, p);
    INFO(text);
    const auto rows = ascii_rows(text);
    REQUIRE(static_cast<int>(rows.size()) == s.stages);
    for (const auto& line : lines_of(text))
      if (line.rfind("rank ", 0) == 0) CHECK(line.size() <= 120);
    // The header states the column width; every pass at least that long shows at its middle.
    const auto at = text.find("1 column = ");
    REQUIRE(at != std::string::npos);
    const double tpc = std::strtod(text.c_str() + at + 11, nullptr);
    REQUIRE(tpc > 0);
    CHECK(rows[0].size() == static_cast<std::size_t>(std::ceil(r.makespan / tpc - 1e-9)));
    for (int rank = 0; rank < s.stages; ++rank)
      for (const auto& t : r.timeline[static_cast<std::size_t>(rank)])
        if (t.end - t.start >= tpc) {
          const auto c = static_cast<std::size_t>((t.start + t.end) / 2 / tpc);
          INFO(to_string(t.act) << " on rank " << rank);
          CHECK(rows[static_cast<std::size_t>(rank)][c] != '.');
        }
  }
}

TEST_CASE("ascii timeline refuses a result of another plan and a bad column width",
          "[render][ascii]") {
  const plan p = make_plan<gpipe>(shape{4, 2, 1});
  const auto other = simulate(make_plan<gpipe>(shape{2, 2, 1}), unit_costs);
  CHECK_THROWS_AS(ascii_timeline(other, p), pipit::error);
  const auto r = simulate(p, unit_costs);
  CHECK_THROWS_AS(ascii_timeline(r, p, -1), pipit::error);
  CHECK_THROWS_AS(ascii_timeline(r, p, 1e-9), pipit::error);  // 10^10 columns
}

// ---- SVG ------------------------------------------------------------------------------------

TEST_CASE("svg timeline is a balanced standalone document with a rect per compute pass",
          "[render][svg]") {
  const plan base = make_plan<one_f_one_b>(shape{4, 8, 1});
  for (const plan& p : {base, lower(base), make_plan<gpipe>(shape{3, 5, 1}), two_chunk_plan()}) {
    INFO(p.schedule << " lowered=" << p.lowered);
    const auto r = simulate(p, unit_costs);
    const std::string doc = svg_timeline(r, p);
    std::string why;
    const bool balanced = tags_balanced(doc, why);
    INFO(why);
    CHECK(balanced);
    CHECK(count(doc, "<svg ") == 1);
    CHECK(count(doc, "</svg>") == 1);
    CHECK(doc.find("xmlns=\"http://www.w3.org/2000/svg\"") != std::string::npos);
    CHECK(doc.find("viewBox=\"0 0 ") != std::string::npos);
    CHECK(count(doc, "<rect class=\"pass\"") == compute_count(p));
    CHECK(count(doc, "<rect class=\"lane\"") == static_cast<std::size_t>(p.rank_count()));
    for (int rank = 0; rank < p.rank_count(); ++rank)
      CHECK(doc.find(">rank " + std::to_string(rank) + "</text>") != std::string::npos);
    CHECK(doc.find("makespan " + pipit::render::detail::format_number(r.makespan)) !=
          std::string::npos);
  }
}

TEST_CASE("svg timeline escapes the title and colours chunk 1 darker", "[render][svg]") {
  const plan p = two_chunk_plan();
  const auto r = simulate(p, unit_costs);
  const std::string doc = svg_timeline(r, p, svg_options{.title = "a<b & \"c\" 'd'"});
  std::string why;
  const bool balanced = tags_balanced(doc, why);
  INFO(why);
  CHECK(balanced);
  CHECK(doc.find("a&lt;b &amp; &quot;c&quot; &apos;d&apos;") != std::string::npos);
  CHECK(doc.find("a<b") == std::string::npos);
  CHECK(doc.find("\"c\"") == std::string::npos);
  // BW of chunk 0 and of chunk 1 get different fills, both listed in the legend.
  const auto fill_of = [&](std::string_view act) {
    const auto at = doc.rfind("<rect", doc.find("data-action=\"" + std::string(act) + "\""));
    const auto f = doc.find("fill=\"", at);
    return doc.substr(f + 6, 7);
  };
  CHECK(fill_of("BW0.0") != fill_of("BW2.0"));
  CHECK(fill_of("F0.0") != fill_of("F2.0"));
  CHECK(fill_of("F0.0") != fill_of("BW0.0"));
  CHECK(doc.find("chunk 1") != std::string::npos);
}

TEST_CASE("svg timeline widths scale with the makespan and px_per_unit", "[render][svg]") {
  const plan small = make_plan<gpipe>(shape{4, 8, 1}), big = make_plan<gpipe>(shape{4, 16, 1});
  const auto rs = simulate(small, unit_costs), rb = simulate(big, unit_costs);
  const std::string ds = svg_timeline(rs, small), db = svg_timeline(rb, big);
  CHECK(attribute(ds, "class=\"lane\"", "width") == Approx(rs.makespan * 24));
  CHECK(attribute(db, "class=\"lane\"", "width") == Approx(rb.makespan * 24));
  // The document grows by exactly the extra chart width once the chart is the widest part.
  CHECK(attribute(db, "<svg ", "width") - attribute(ds, "<svg ", "width") ==
        Approx((rb.makespan - rs.makespan) * 24).margin(1));
  const std::string wide = svg_timeline(rb, big, svg_options{.px_per_unit = 48});
  CHECK(attribute(wide, "class=\"lane\"", "width") == Approx(rb.makespan * 48));
  // Pass geometry: x and width follow start and end.
  const double x0 = attribute(wide, "data-action=\"BW0.0\"", "x");
  const double x1 = attribute(wide, "data-action=\"BW0.1\"", "x");
  CHECK(x1 - x0 == Approx(2 * 48));  // consecutive BWs on rank 0, 2 units each
  CHECK(attribute(wide, "data-action=\"BW0.0\"", "width") == Approx(2 * 48));
  CHECK(attribute(wide, "data-action=\"F3.0\"", "y") >
        attribute(wide, "data-action=\"F0.0\"", "y"));
}

TEST_CASE("svg timeline shows the legend, microbatch labels and axis on request", "[render][svg]") {
  const plan p = make_plan<one_f_one_b>(shape{2, 3, 1});
  const auto r = simulate(p, unit_costs);
  const std::string with = svg_timeline(r, p);
  const std::string without = svg_timeline(r, p, svg_options{.show_legend = false});
  CHECK(count(with, "class=\"legend\"") == 3);  // F, BW, idle
  CHECK(count(without, "class=\"legend\"") == 0);
  CHECK(count(with, "class=\"tick\"") >= 2);
  // At 24 px per unit every pass is wide enough for its number: 12 labels over 12 passes.
  CHECK(count(with, "text-anchor=\"middle\" fill=\"#ffffff\">") == compute_count(p));
  // At 2 px per unit none is.
  CHECK(count(svg_timeline(r, p, svg_options{.px_per_unit = 2}),
              "text-anchor=\"middle\" fill=\"#ffffff\">") == 0);
  CHECK_THROWS_AS(svg_timeline(r, p, svg_options{.px_per_unit = 0}), pipit::error);
}

// ---- Chrome trace ---------------------------------------------------------------------------

TEST_CASE("the test's JSON reader rejects what it should", "[render][trace]") {
  CHECK(is_json(R"({"a":[1,2.5,-3e2,{"b":null}],"c":"x\"y","d":true})"));
  CHECK_FALSE(is_json(R"({"a":[1,2,]})"));   // trailing comma in an array
  CHECK_FALSE(is_json(R"({"a":1,})"));       // trailing comma in an object
  CHECK_FALSE(is_json(R"({"a":[1,2})"));     // unbalanced
  CHECK_FALSE(is_json(R"({"a":"b})"));       // unterminated string
  CHECK_FALSE(is_json(R"({"a":1,5})"));      // decimal comma
  CHECK_FALSE(is_json("{\"a\":\"x\ny\"}"));  // raw newline in a string
  CHECK_FALSE(is_json(R"({"a":1}})"));       // trailing characters
}

TEST_CASE("chrome trace is valid JSON with one X event per compute pass", "[render][trace]") {
  const plan base = make_plan<one_f_one_b>(shape{4, 6, 1});
  for (const plan& p : {base, lower(base), make_plan<gpipe>(shape{3, 4, 1}), two_chunk_plan()}) {
    INFO(p.schedule << " lowered=" << p.lowered);
    const costs c{.f = 1.0, .b = 1.25, .w = 0.5, .comm = 0.1};
    const auto r = simulate(p, c);
    const double us = 250;
    const std::string text = chrome_trace(r, p, us);
    const json doc = parse_json(text);
    REQUIRE(doc.kind == json::object);
    REQUIRE(doc.get("displayTimeUnit"));
    CHECK(doc.get("displayTimeUnit")->str == "ms");
    const json* events = doc.get("traceEvents");
    REQUIRE(events);
    REQUIRE(events->kind == json::array);

    std::size_t complete = 0;
    std::map<std::string, const json*> by_name;  // X events by action text
    std::map<int, std::string> thread_names;
    std::string process_name;
    for (const json& e : events->items) {
      REQUIRE(e.kind == json::object);
      const json* ph = e.get("ph");
      REQUIRE(ph);
      REQUIRE(e.get("pid"));
      CHECK(e.get("pid")->num == 0);
      if (const json* tid = e.get("tid")) {
        CHECK(tid->num >= 0);
        CHECK(tid->num < p.rank_count());
      }
      if (ph->str == "X") {
        ++complete;
        REQUIRE(e.get("tid"));
        REQUIRE(e.get("ts"));
        REQUIRE(e.get("dur"));
        REQUIRE(e.get("args"));
        by_name[e.get("name")->str] = &e;
      } else if (ph->str == "M" && e.get("name")->str == "process_name") {
        process_name = e.get("args")->get("name")->str;
      } else if (ph->str == "M" && e.get("name")->str == "thread_name") {
        thread_names[static_cast<int>(e.get("tid")->num)] = e.get("args")->get("name")->str;
      }
    }
    CHECK(complete == compute_count(p));
    CHECK(process_name == "pipit " + std::string(p.schedule));
    REQUIRE(static_cast<int>(thread_names.size()) == p.rank_count());
    for (int rank = 0; rank < p.rank_count(); ++rank)
      CHECK(thread_names[rank] == "rank " + std::to_string(rank));

    // Every pass of the timeline, with its times, rank and identity.
    for (int rank = 0; rank < p.rank_count(); ++rank)
      for (const auto& t : r.timeline[static_cast<std::size_t>(rank)]) {
        const std::string name = to_string(t.act);
        INFO(name);
        REQUIRE(by_name.count(name) == 1);
        const json& e = *by_name[name];
        CHECK(e.get("cat")->str == std::string(pipit::schedule::name(t.act.kind)));
        CHECK(e.get("tid")->num == rank);
        CHECK(e.get("ts")->num == Approx(t.start * us).margin(1e-3));
        CHECK(e.get("dur")->num == Approx((t.end - t.start) * us).margin(1e-3));
        const json& args = *e.get("args");
        CHECK(args.get("stage")->num == t.act.stage);
        CHECK(args.get("microbatch")->num == t.act.microbatch);
        CHECK(args.get("chunk")->num == chunk_of(p.place, p.shp, t.act.stage));
      }
  }
}

TEST_CASE("chrome trace puts a chosen pass at start times us_per_unit", "[render][trace]") {
  const plan p = make_plan<one_f_one_b>(shape{4, 4, 1});
  const auto r = simulate(p, costs{.f = 1.0, .b = 2.0, .w = 0.0});
  // Rank 3's first backward: F3.0 runs [3, 4), so BW3.0 runs [4, 6).
  const json doc = parse_json(chrome_trace(r, p, 1000));
  const json* found = nullptr;
  for (const json& e : doc.get("traceEvents")->items)
    if (e.get("name")->str == "BW3.0") found = &e;
  REQUIRE(found);
  CHECK(found->get("ts")->num == 4000);
  CHECK(found->get("dur")->num == 2000);
  CHECK(found->get("tid")->num == 3);
  CHECK(found->get("cat")->str == "BW");
  // Fractional microseconds keep a '.' decimal point and three decimals.
  const std::string fine = chrome_trace(r, p, 0.0625);
  CHECK(fine.find("\"ts\":0.25,") != std::string::npos);  // BW3.0 at 4 units
  CHECK(is_json(fine));
}

TEST_CASE("chrome trace escapes the schedule name and refuses bad input", "[render][trace]") {
  plan p = make_plan<gpipe>(shape{2, 2, 1});
  p.schedule = "we\"ird\\name\n\x01";
  const auto r = simulate(p, unit_costs);
  const std::string text = chrome_trace(r, p);
  const json doc = parse_json(text);
  bool found = false;
  for (const json& e : doc.get("traceEvents")->items)
    if (e.get("name")->str == "process_name")
      found = e.get("args")->get("name")->str == "pipit we\"ird\\name\n\x01";
  CHECK(found);
  CHECK_THROWS_AS(chrome_trace(r, p, 0), pipit::error);
  CHECK_THROWS_AS(chrome_trace(r, p, std::nan("")), pipit::error);
  const auto other = simulate(make_plan<gpipe>(shape{3, 2, 1}), unit_costs);
  CHECK_THROWS_AS(chrome_trace(other, p), pipit::error);
  // The SVG of that plan escapes it too, and stays balanced.
  const std::string doc_svg = svg_timeline(r, p);
  CHECK(doc_svg.find("we&quot;ird\\name") != std::string::npos);
  std::string why;
  CHECK(tags_balanced(doc_svg, why));
}
