#pragma once
// svg_timeline: a simulated plan as a standalone SVG document (open it in a browser, or embed
// it in docs): one lane per rank, a rectangle per compute pass coloured by kind with its
// microbatch number, a time axis, a title with the schedule's numbers, and a legend.
//
// Structure, for tools that post-process it: every pass is a <rect class="pass"> carrying
// data-action ("F3.1"), data-start and data-end, with a <title> tooltip; every rank's idle
// background is a <rect class="lane">, as wide as the makespan.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/render/common.hpp"
#include "pipit/schedule/action.hpp"
#include "pipit/schedule/plan.hpp"
#include "pipit/sim/simulate.hpp"

namespace pipit::render {

struct svg_options {
  double px_per_unit = 24;  // horizontal pixels per unit of simulated time
  int row_height = 28;      // pixels per rank lane
  std::string title{};      // optional first line above the schedule's summary line
  bool show_legend = true;
};

namespace detail {

// Fill colours per compute kind (indexed by op), for chunk 0; chunk 1 (and odd chunks) use the
// darker shade, so the two halves of an interleaved or V schedule read apart.
struct kind_colour {
  std::string_view light, dark;
};
inline constexpr std::array<kind_colour, 8> svg_colours = {{
    {"#5b9bd5", "#2c5f8e"},  // F  blue
    {"#ed7d31", "#a4501a"},  // B  orange
    {"#70ad47", "#42702a"},  // W  green
    {"#9a6fc4", "#5e3d85"},  // BW purple
    {"#d4a72c", "#8a6a12"},  // S
    {"#c0504d", "#7d2b29"},  // T
    {"#4bacc6", "#23687b"},  // IF
    {"#8c8c8c", "#505050"},  // IB
}};
inline constexpr std::string_view svg_idle_colour = "#ececec";

inline std::string_view svg_fill(schedule::op o, bool odd_chunk) {
  const auto& c = svg_colours[static_cast<std::size_t>(o)];
  return odd_chunk ? c.dark : c.light;
}

// Rough advance of one character of the sans-serif font, as a fraction of the font size; used
// only to decide whether a label fits and how wide text lines are.
inline constexpr double svg_char_width = 0.58;

}  // namespace detail

// Throws pipit::error when the result is not the plan's or the options are not positive.
inline std::string svg_timeline(const sim::result& r, const schedule::plan& p,
                                const svg_options& o = {}) {
  using detail::format_number;
  detail::require_matches("svg_timeline", r, p);
  if (!std::isfinite(o.px_per_unit) || !(o.px_per_unit > 0) || o.row_height <= 0)
    fail("pipit: svg_timeline(): px_per_unit and row_height must be > 0, got ", o.px_per_unit,
         " and ", o.row_height);
  const int ranks = p.rank_count();
  const double font = 12, pad = 12, gap = 4;
  const double row_h = o.row_height, pitch = row_h + gap;
  const double label_w =
      detail::svg_char_width * font * static_cast<double>(("rank " + std::to_string(ranks)).size());
  const double left = pad + label_w + 8;
  const double chart_w = std::max(0.0, r.makespan) * o.px_per_unit;

  // Header: the caller's title (bold) over the summary line.
  const std::string summary = detail::summary(r, p, "  \u00b7  ");  // SVG collapses spaces
  double y = pad;
  std::string head;
  double text_w = 0;  // widest text line, for the document width
  auto header_line = [&](const std::string& text, double size, bool bold) {
    y += size + 4;
    head += "<text x=\"" + format_number(pad) + "\" y=\"" + format_number(y) + "\" font-size=\"" +
            format_number(size) + "\"" + (bold ? " font-weight=\"bold\"" : "") + ">" +
            detail::xml_escape(text) + "</text>\n";
    text_w =
        std::max(text_w, pad + detail::svg_char_width * size * static_cast<double>(text.size()));
  };
  if (!o.title.empty()) header_line(o.title, 15, true);
  header_line(summary, o.title.empty() ? 14 : 12, o.title.empty());
  const double top = y + 12;

  // Lanes and passes.
  std::string body;
  std::array<bool, 8> present{};
  std::array<bool, 8> present_odd{};
  for (int rank = 0; rank < ranks; ++rank) {
    const double y0 = top + rank * pitch;
    body += "<text x=\"" + format_number(left - 8) + "\" y=\"" +
            format_number(y0 + row_h / 2 + font * 0.35) + "\" font-size=\"" + format_number(font) +
            "\" text-anchor=\"end\">rank " + std::to_string(rank) + "</text>\n";
    body += "<rect class=\"lane\" x=\"" + format_number(left) + "\" y=\"" + format_number(y0) +
            "\" width=\"" + format_number(chart_w) + "\" height=\"" + format_number(row_h) +
            "\" fill=\"" + std::string(detail::svg_idle_colour) + "\"/>\n";
    for (const auto& t : r.timeline[static_cast<std::size_t>(rank)]) {
      if (!schedule::is_compute(t.act.kind)) continue;
      const bool odd = detail::chunk_of(p, t.act) % 2 == 1;
      (odd ? present_odd : present)[static_cast<std::size_t>(t.act.kind)] = true;
      const double x = left + t.start * o.px_per_unit, w = (t.end - t.start) * o.px_per_unit;
      const std::string text = schedule::to_string(t.act);
      body += "<rect class=\"pass\" x=\"" + format_number(x) + "\" y=\"" + format_number(y0) +
              "\" width=\"" + format_number(w) + "\" height=\"" + format_number(row_h) +
              "\" fill=\"" + std::string(detail::svg_fill(t.act.kind, odd)) +
              "\" stroke=\"#ffffff\" stroke-width=\"1\" data-action=\"" + text +
              "\" data-start=\"" + format_number(t.start, 6) + "\" data-end=\"" +
              format_number(t.end, 6) + "\"><title>" + text + " on rank " + std::to_string(rank) +
              ": " + format_number(t.start, 6) + " to " + format_number(t.end, 6) +
              "</title></rect>\n";
      // The microbatch number, when the pass is wide and tall enough for it.
      const std::string mb = std::to_string(t.act.microbatch);
      const double size = std::min(font, row_h - 4);
      if (size >= 7 && detail::svg_char_width * size * static_cast<double>(mb.size()) + 4 <= w)
        body += "<text x=\"" + format_number(x + w / 2) + "\" y=\"" +
                format_number(y0 + row_h / 2 + size * 0.35) + "\" font-size=\"" +
                format_number(size) + "\" text-anchor=\"middle\" fill=\"#ffffff\">" + mb +
                "</text>\n";
    }
  }

  // Time axis: ticks at a round step at least ~60 px apart.
  const double axis_y = top + ranks * pitch - gap + 4;
  body += "<line x1=\"" + format_number(left) + "\" y1=\"" + format_number(axis_y) + "\" x2=\"" +
          format_number(left + chart_w) + "\" y2=\"" + format_number(axis_y) +
          "\" stroke=\"#333333\"/>\n";
  body += "<text x=\"" + format_number(left - 12) + "\" y=\"" + format_number(axis_y + 16) +
          "\" font-size=\"" + format_number(font) + "\" text-anchor=\"end\">time</text>\n";
  if (r.makespan > 0) {
    const double step = detail::nice_step(60 / o.px_per_unit);
    for (int i = 0; i * step <= r.makespan * (1 + 1e-12); ++i) {
      const double x = left + i * step * o.px_per_unit;
      body += "<line class=\"tick\" x1=\"" + format_number(x) + "\" y1=\"" + format_number(axis_y) +
              "\" x2=\"" + format_number(x) + "\" y2=\"" + format_number(axis_y + 5) +
              "\" stroke=\"#333333\"/>\n";
      body += "<text x=\"" + format_number(x) + "\" y=\"" + format_number(axis_y + 16) +
              "\" font-size=\"" + format_number(font - 1) + "\" text-anchor=\"middle\">" +
              format_number(i * step, 4) + "</text>\n";
    }
  }
  double bottom = axis_y + 22;
  double right = std::max(left + chart_w + pad + 12, text_w + pad);  // room for the last label

  // Legend: a swatch per kind and shade that appears, then idle, wrapping at the
  // chart's width.
  if (o.show_legend) {
    struct item {
      std::string colour, label;
    };
    std::vector<item> items;
    for (std::size_t k = 0; k < present.size(); ++k)
      for (int odd = 0; odd < 2; ++odd) {
        if (!(odd ? present_odd : present)[k]) continue;
        const auto kind = static_cast<schedule::op>(k);
        std::string label(schedule::name(kind));
        label += ' ';
        label += detail::describe(kind);
        if (p.shp.chunks == 2) label += odd ? ", chunk 1" : ", chunk 0";
        if (p.shp.chunks > 2) label += odd ? ", odd chunks" : ", even chunks";
        items.push_back({std::string(detail::svg_fill(kind, odd != 0)), label});
      }
    items.push_back({std::string(detail::svg_idle_colour), "idle"});
    const double wrap = std::max(right, 480.0) - pad;
    double x = pad, line_y = bottom + 8;
    for (const auto& it : items) {
      const double w =
          14 + 6 + detail::svg_char_width * font * static_cast<double>(it.label.size());
      if (x > pad && x + w > wrap) x = pad, line_y += 20;
      body += "<rect class=\"legend\" x=\"" + format_number(x) + "\" y=\"" + format_number(line_y) +
              "\" width=\"14\" height=\"14\" fill=\"" + it.colour +
              "\" stroke=\"#999999\" stroke-width=\"0.5\"/>\n";
      body += "<text x=\"" + format_number(x + 20) + "\" y=\"" + format_number(line_y + 11) +
              "\" font-size=\"" + format_number(font) + "\">" + detail::xml_escape(it.label) +
              "</text>\n";
      right = std::max(right, x + w + pad);
      x += w + 24;
    }
    bottom = line_y + 14;
  }

  const std::string width = format_number(std::ceil(right)),
                    height = format_number(std::ceil(bottom + pad));
  std::string out = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
  out += "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + width + "\" height=\"" + height +
         "\" viewBox=\"0 0 " + width + " " + height +
         "\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">\n";
  out += "<rect class=\"background\" width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n";
  out += head + body + "</svg>\n";
  return out;
}

}  // namespace pipit::render
