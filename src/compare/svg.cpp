#include "compare/svg.h"

#include "core/text.h"

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <limits>
#include <vector>

namespace mpt::compare {

namespace {

const char* const kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                               "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"};
std::string color(size_t i) { return kColors[i % (sizeof kColors / sizeof kColors[0])]; }

// Round tick positions covering [lo, hi]: steps of 1, 2 or 5 times a power of ten.
std::vector<double> ticks(double lo, double hi, int target = 5) {
  if (!(hi > lo)) hi = lo + 1.0;
  const double raw = (hi - lo) / target;
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  // From the last tick at or below lo to the first at or above hi, so the axis ends on labels.
  const long first = static_cast<long>(std::floor(lo / step + 1e-9));
  const long last = static_cast<long>(std::ceil(hi / step - 1e-9));
  std::vector<double> t;
  for (long k = first; k <= last; ++k) t.push_back(k == 0 ? 0.0 : k * step);
  return t;
}

std::string si(double v) {  // 12.5k, 3M
  const double a = std::fabs(v);
  if (a >= 1e9) return strf("%gG", v / 1e9);
  if (a >= 1e6) return strf("%gM", v / 1e6);
  if (a >= 1e3) return strf("%gk", v / 1e3);
  return strf("%g", v);
}

struct Range {
  double lo = std::numeric_limits<double>::infinity();
  double hi = -std::numeric_limits<double>::infinity();
  void add(double v) {
    if (std::isfinite(v)) lo = std::min(lo, v), hi = std::max(hi, v);
  }
  bool ok() const { return lo <= hi; }
  void pad(double frac) {
    if (!ok()) lo = 0, hi = 1;
    if (hi - lo < 1e-12) lo -= 0.5 * std::max(std::fabs(lo), 1e-3) * 0.1 + 1e-6, hi += (hi - lo);
    const double p = (hi - lo) * frac;
    lo -= p, hi += p;
  }
};

// A plot area in pixels and the data range it shows.
struct Frame {
  double x0, y0, w, h;  // pixels: left, top, width, height
  double xlo, xhi, ylo, yhi;
  double px(double x) const { return x0 + (x - xlo) / (xhi - xlo) * w; }
  double py(double y) const { return y0 + h - (y - ylo) / (yhi - ylo) * h; }
};

// Axes, grid, tick labels, axis titles and the panel title; the ranges are widened to the ticks.
std::string axes(Frame& f, const std::string& title, const std::string& xlabel,
                 const std::string& ylabel, bool si_x, int ydigits) {
  const auto xt = ticks(f.xlo, f.xhi), yt = ticks(f.ylo, f.yhi);
  f.xlo = std::min(f.xlo, xt.front()), f.xhi = std::max(f.xhi, xt.back());
  f.ylo = std::min(f.ylo, yt.front()), f.yhi = std::max(f.yhi, yt.back());
  std::string s = "<g class=\"axes\">\n";
  s += strf("<text class=\"title\" x=\"%.1f\" y=\"%.1f\">%s</text>\n", f.x0, f.y0 - 12, xml_escape(title).c_str());
  s += strf("<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"#fff\" stroke=\"#999\"/>\n", f.x0, f.y0, f.w, f.h);
  for (double v : xt) {
    const double x = f.px(v);
    s += strf("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" class=\"grid\"/>\n", x, f.y0, x, f.y0 + f.h);
    s += strf("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n", x, f.y0 + f.h + 16,
              xml_escape(si_x ? si(v) : strf("%g", v)).c_str());
  }
  for (double v : yt) {
    const double y = f.py(v);
    s += strf("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" class=\"grid\"/>\n", f.x0, y, f.x0 + f.w, y);
    s += strf("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%.*f</text>\n", f.x0 - 6, y + 4, ydigits, v);
  }
  s += strf("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n", f.x0 + f.w / 2, f.y0 + f.h + 34,
            xml_escape(xlabel).c_str());
  s += strf("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" transform=\"rotate(-90 %.1f %.1f)\">%s</text>\n",
            f.x0 - 58, f.y0 + f.h / 2, f.x0 - 58, f.y0 + f.h / 2, xml_escape(ylabel).c_str());
  return s + "</g>\n";
}

int digits_for(double lo, double hi) {
  const double span = hi - lo;
  if (span <= 0) return 3;
  return std::clamp(static_cast<int>(std::ceil(-std::log10(span / 5))) + 1, 0, 6);
}

// Linear interpolation of a curve (by tokens), clamped at its ends.
double interp(const std::vector<CurvePoint>& c, double t) {
  if (c.empty()) return std::nan("");
  if (t <= c.front().tokens) return c.front().value;
  if (t >= c.back().tokens) return c.back().value;
  for (size_t i = 1; i < c.size(); ++i)
    if (t <= c[i].tokens) {
      const double a = c[i - 1].tokens, b = c[i].tokens;
      const double u = b > a ? (t - a) / (b - a) : 1.0;
      return c[i - 1].value + u * (c[i].value - c[i - 1].value);
    }
  return c.back().value;
}

std::string polyline(const Frame& f, const std::vector<std::pair<double, double>>& pts,
                     const std::string& attrs) {
  // A diverged run's non-finite losses have no place on the plot (nor any SVG syntax): its
  // curve ends where they begin.
  std::string s = "<polyline " + attrs + " points=\"";
  bool first = true;
  for (const auto& [x, y] : pts) {
    if (!std::isfinite(x) || !std::isfinite(y)) continue;
    s += strf("%s%.1f,%.1f", first ? "" : " ", f.px(x), f.py(y));
    first = false;
  }
  return s + "\"/>\n";
}

std::string short_label(const std::string& s, size_t n = 22) {
  return s.size() <= n ? s : s.substr(0, n - 1) + "~";
}

// One value per run (NaN: none) and the text written at the end of its bar.
struct BarSeries {
  std::vector<double> values;
  std::vector<std::string> texts;
  bool any() const {
    return std::any_of(values.begin(), values.end(), [](double v) { return std::isfinite(v); });
  }
};

// Horizontal bars, one per run, with the value written at the end of each bar. With a `second`
// series that holds any value, each run gets a second, lighter bar under the first
// (class "bar-measured"), on the same scale.
std::string bars(const Comparison& c, double x0, double y0, double w, double h, const std::string& title,
                 const std::string& id, const BarSeries& first, const std::string& unit,
                 const BarSeries* second = nullptr) {
  if (second && !second->any()) second = nullptr;
  const std::vector<double>& values = first.values;
  const std::vector<std::string>& texts = first.texts;
  const double label_w = 150;
  Frame f{x0 + label_w, y0, w - label_w, h, 0, 1, 0, 1};
  double hi = 0;
  for (double v : values) hi = std::max(hi, std::isfinite(v) ? v : 0.0);
  if (second)
    for (double v : second->values) hi = std::max(hi, std::isfinite(v) ? v : 0.0);
  f.xhi = hi > 0 ? hi * 1.15 : 1.0;
  const auto xt = ticks(0, f.xhi, 4);
  f.xhi = std::max(f.xhi, xt.back());
  std::string s = strf("<g id=\"%s\">\n", id.c_str());
  s += strf("<text class=\"title\" x=\"%.1f\" y=\"%.1f\">%s</text>\n", x0, y0 - 12, xml_escape(title).c_str());
  s += strf("<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"#fff\" stroke=\"#999\"/>\n", f.x0, f.y0, f.w, f.h);
  for (double v : xt) {
    const double x = f.px(v);
    s += strf("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" class=\"grid\"/>\n", x, f.y0, x, f.y0 + f.h);
    s += strf("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n", x, f.y0 + f.h + 16, si(v).c_str());
  }
  s += strf("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n", f.x0 + f.w / 2, f.y0 + f.h + 34,
            xml_escape(unit).c_str());
  const double slot = h / std::max<size_t>(c.runs.size(), 1);
  const double bh = std::min(second ? 28.0 : 24.0, slot * 0.7);
  for (size_t i = 0; i < c.runs.size(); ++i) {
    const auto& r = c.runs[i];
    const double slot_c = y0 + slot * (i + 0.5);
    s += strf("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%s</text>\n", f.x0 - 6, slot_c + 4,
              xml_escape(short_label(r.data.label) + (r.is_baseline ? " *" : "")).c_str());
    if (second) {
      const double sh = bh / 2 - 1, sy = slot_c + sh / 2 + 1;
      const double v = second->values[i];
      if (std::isfinite(v)) {
        const double bw = f.px(v) - f.x0;
        s += strf("<rect class=\"bar-measured\" data-run=\"%s\" x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" "
                  "height=\"%.1f\" fill=\"%s\" fill-opacity=\"0.35\" stroke=\"%s\"/>\n",
                  xml_escape(r.data.label).c_str(), f.x0, sy - sh / 2, bw, sh, color(i).c_str(),
                  color(i).c_str());
        s += strf("<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\">%s</text>\n", f.x0 + bw + 4, sy + 4,
                  xml_escape(second->texts[i]).c_str());
      }
    }
    // With two bars the first takes the upper half of the slot.
    const double yc = second ? slot_c - bh / 4 - 0.5 : slot_c;
    const double bar_h = second ? bh / 2 - 1 : bh;
    const double v = values[i];
    if (!std::isfinite(v)) {
      s += strf("<text x=\"%.1f\" y=\"%.1f\" fill=\"#777\">n/a</text>\n", f.x0 + 4, yc + 4);
      continue;
    }
    const double bw = f.px(v) - f.x0;
    s += strf("<rect class=\"bar\" data-run=\"%s\" x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" fill=\"%s\"/>\n",
              xml_escape(r.data.label).c_str(), f.x0, yc - bar_h / 2, bw, bar_h, color(i).c_str());
    s += strf("<text x=\"%.1f\" y=\"%.1f\">%s</text>\n", f.x0 + bw + 4, yc + 4, xml_escape(texts[i]).c_str());
  }
  return s + "</g>\n";
}

}  // namespace

std::string xml_escape(const std::string& in) {
  std::string s;
  for (char ch : in) {
    switch (ch) {
      case '&': s += "&amp;"; break;
      case '<': s += "&lt;"; break;
      case '>': s += "&gt;"; break;
      case '"': s += "&quot;"; break;
      case '\'': s += "&apos;"; break;
      case '\t': case '\n': case '\r': s += ch; break;
      default:
        // XML 1.0 has no place for the other control characters, not even as references.
        if (static_cast<unsigned char>(ch) < 0x20) s += "\xEF\xBF\xBD";  // U+FFFD
        else s += ch;
    }
  }
  return s;
}

std::string render_svg(const Comparison& c) {
  const double W = 1000, left = 90, plot_w = 620;
  const double legend_x = left + plot_w + 30;
  const RunData& base = c.runs[c.baseline].data;
  std::string s;
  // Two memory bars per run (predicted and measured) need taller slots.
  const bool measured = std::any_of(c.runs.begin(), c.runs.end(),
                                    [](const RunResult& r) { return r.data.measured_peak_bytes.has_value(); });
  const double bars_y0 = 720, bars_h = std::max(120.0, (measured ? 44.0 : 34.0) * c.runs.size());
  const double H = bars_y0 + bars_h + (measured ? 86 : 70);
  s += strf("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
            "font-family=\"sans-serif\" font-size=\"12\">\n",
            W, H, W, H);
  s += "<style>.title{font-size:15px;font-weight:bold}.grid{stroke:#e3e3e3;stroke-width:1}"
       ".val-curve{fill:none;stroke-width:2.5}.train-curve{fill:none;stroke-width:1;opacity:0.45}"
       ".diff-curve{fill:none;stroke-width:2}.noise-band{fill:#999;opacity:0.25;stroke:none}</style>\n";
  s += strf("<rect width=\"%.0f\" height=\"%.0f\" fill=\"#fafafa\"/>\n", W, H);
  s += strf("<text x=\"%.1f\" y=\"24\" font-size=\"17\" font-weight=\"bold\">mpt compare: %zu runs, baseline %s (%s)</text>\n",
            left, c.runs.size(), xml_escape(base.label).c_str(), xml_escape(base.policy).c_str());

  // (1) validation loss (and thin training loss) against tokens.
  {
    Frame f{left, 70, plot_w, 250, 0, 1, 0, 1};
    Range xr, yr;
    for (const auto& r : c.runs) {
      for (const auto& p : r.data.eval) xr.add(p.tokens), yr.add(p.value);
      for (const auto& p : r.data.train) xr.add(p.tokens), yr.add(p.value);
    }
    xr.lo = 0;
    if (!xr.ok() || xr.hi <= 0) xr.hi = 1;
    yr.pad(0.03);
    f.xlo = xr.lo, f.xhi = xr.hi, f.ylo = yr.lo, f.yhi = yr.hi;
    s += axes(f, "Loss against training tokens (thick: validation, thin: training)", "training tokens",
              "loss (nats/token)", true, digits_for(f.ylo, f.yhi));
    for (size_t i = 0; i < c.runs.size(); ++i) {
      const auto& d = c.runs[i].data;
      std::vector<std::pair<double, double>> tp, vp;
      for (const auto& p : d.train) tp.emplace_back(p.tokens, p.value);
      for (const auto& p : d.eval) vp.emplace_back(p.tokens, p.value);
      const std::string run = xml_escape(d.label);
      if (!tp.empty())
        s += polyline(f, tp, strf("id=\"train-%zu\" class=\"train-curve\" data-run=\"%s\" stroke=\"%s\"", i,
                                  run.c_str(), color(i).c_str()));
      if (!vp.empty())
        s += polyline(f, vp, strf("id=\"val-%zu\" class=\"val-curve\" data-run=\"%s\" stroke=\"%s\"", i,
                                  run.c_str(), color(i).c_str()));
    }
    // Legend.
    s += "<g id=\"legend\">\n";
    s += strf("<text class=\"title\" x=\"%.1f\" y=\"%.1f\">Runs</text>\n", legend_x, f.y0 + 4);
    for (size_t i = 0; i < c.runs.size(); ++i) {
      const auto& r = c.runs[i];
      const double y = f.y0 + 26 + 36 * i;
      s += strf("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"%s\" stroke-width=\"3\"/>\n",
                legend_x, y - 4, legend_x + 24, y - 4, color(i).c_str());
      s += strf("<text x=\"%.1f\" y=\"%.1f\">%s%s</text>\n", legend_x + 30, y,
                xml_escape(short_label(r.data.label, 28)).c_str(), r.is_baseline ? " (baseline)" : "");
      s += strf("<text x=\"%.1f\" y=\"%.1f\" fill=\"#555\" font-size=\"11\">%s, seed %llu/%llu%s</text>\n",
                legend_x + 30, y + 14, xml_escape(r.data.policy).c_str(),
                (unsigned long long)r.data.training_seed, (unsigned long long)r.data.init_seed,
                !r.data.val_loss                   ? ""
                : std::isfinite(*r.data.val_loss) ? strf(", val %.4f", *r.data.val_loss).c_str()
                                                  : ", val diverged");
    }
    s += "</g>\n";
  }

  // (2) difference from the baseline's validation loss, with the seed-noise band.
  {
    Frame f{left, 400, plot_w, 220, 0, 1, 0, 1};
    Range xr, yr;
    xr.lo = 0;
    yr.add(0);
    std::vector<std::vector<std::pair<double, double>>> curves(c.runs.size());
    for (size_t i = 0; i < c.runs.size(); ++i)
      for (const auto& p : c.runs[i].data.eval) {
        const double d = p.value - interp(base.eval, p.tokens);
        curves[i].emplace_back(p.tokens, d);
        xr.add(p.tokens), yr.add(d);
      }
    // The band at each of the baseline's eval points: ± the spread (max - min) of the
    // baseline-policy seed runs there.
    std::vector<std::pair<double, double>> band;
    if (c.band) {
      for (const auto& p : base.eval) {
        double lo = std::numeric_limits<double>::infinity(), hi = -lo;
        for (const auto& r : c.runs)
          if (std::find(c.band->runs.begin(), c.band->runs.end(), r.data.label) != c.band->runs.end()) {
            const double v = interp(r.data.eval, p.tokens);
            lo = std::min(lo, v), hi = std::max(hi, v);
          }
        if (hi >= lo) band.emplace_back(p.tokens, hi - lo), yr.add(hi - lo), yr.add(lo - hi);
      }
    }
    if (!xr.ok() || xr.hi <= 0) xr.hi = 1;
    yr.pad(0.08);
    f.xlo = xr.lo, f.xhi = xr.hi, f.ylo = yr.lo, f.yhi = yr.hi;
    s += axes(f, "Validation loss minus the baseline's (" + base.label + ")" +
                     (c.band ? ", shaded: " + c.band->policy + " seed noise (± max-min)" : ""),
              "training tokens", "Δ val loss (nats/token)", true, digits_for(f.ylo, f.yhi));
    if (!band.empty()) {
      std::string pts;
      for (const auto& b : band) pts += strf("%.1f,%.1f ", f.px(b.first), f.py(b.second));
      for (auto it = band.rbegin(); it != band.rend(); ++it) pts += strf("%.1f,%.1f ", f.px(it->first), f.py(-it->second));
      pts.pop_back();
      s += "<polygon id=\"noise-band\" class=\"noise-band\" points=\"" + pts + "\"/>\n";
      s += strf("<text x=\"%.1f\" y=\"%.1f\" fill=\"#555\">%s seed noise at the end:</text>\n", legend_x,
                f.y0 + 20, xml_escape(c.band->policy).c_str());
      s += strf("<text x=\"%.1f\" y=\"%.1f\" fill=\"#555\">±%.4f (±%.2f%%), %zu seeds</text>\n", legend_x,
                f.y0 + 36, c.band->spread, c.band->spread_pct, c.band->runs.size());
    } else {
      s += strf("<text x=\"%.1f\" y=\"%.1f\" fill=\"#555\">seed noise unknown:</text>\n", legend_x, f.y0 + 20);
      s += strf("<text x=\"%.1f\" y=\"%.1f\" fill=\"#555\">run %s with 2+ seeds</text>\n", legend_x, f.y0 + 36,
                xml_escape(base.policy).c_str());
    }
    s += strf("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333\" stroke-dasharray=\"4 3\"/>\n",
              f.x0, f.py(0), f.x0 + f.w, f.py(0));
    for (size_t i = 0; i < c.runs.size(); ++i)
      if (!curves[i].empty())
        s += polyline(f, curves[i], strf("id=\"diff-%zu\" class=\"diff-curve\" data-run=\"%s\" stroke=\"%s\"", i,
                                         xml_escape(c.runs[i].data.label).c_str(), color(i).c_str()));
    // Final differences as text, one line per run.
    for (size_t i = 0; i < c.runs.size(); ++i) {
      const auto& r = c.runs[i];
      if (r.is_baseline || !r.val_diff_pct) continue;
      s += strf("<text x=\"%.1f\" y=\"%.1f\" fill=\"%s\">%s: %+.2f%%%s</text>\n", legend_x, f.y0 + 60 + 18 * i,
                color(i).c_str(), xml_escape(short_label(r.data.label)).c_str(), *r.val_diff_pct,
                r.inside_band ? (*r.inside_band ? " (inside noise)" : " (outside noise)") : "");
    }
  }

  // (3) bars: steady-state throughput, and predicted memory with the measured peak under it.
  {
    const double y0 = bars_y0, h = bars_h;
    BarSeries tps, mem, peak;
    for (const auto& r : c.runs) {
      const RunData& d = r.data;
      tps.values.push_back(d.tokens_per_s ? *d.tokens_per_s : std::nan(""));
      tps.texts.push_back(d.tokens_per_s ? strf("%.0f", *d.tokens_per_s) +
                                               (r.speedup ? strf(" (%.2fx)", *r.speedup) : "")
                                         : "");
      mem.values.push_back(d.memory_bytes > 0 ? d.memory_bytes / 1048576.0 : std::nan(""));
      mem.texts.push_back(strf("%.2f", d.memory_bytes / 1048576.0) +
                          (r.memory_ratio ? strf(" (%.2fx)", *r.memory_ratio) : ""));
      peak.values.push_back(d.measured_peak_bytes ? *d.measured_peak_bytes / 1048576.0 : std::nan(""));
      peak.texts.push_back(
          d.measured_peak_bytes ? strf("RSS %.1f", *d.measured_peak_bytes / 1048576.0) +
                                      (r.measured_peak_ratio ? strf(" (%.2fx)", *r.measured_peak_ratio) : "")
                                : "");
    }
    s += bars(c, 10, y0, 470, h, "Throughput (steady state)", "throughput-bars", tps, "tokens/s");
    s += bars(c, 510, y0, 470, h,
              measured ? "Memory: predicted (solid), measured peak RSS (light)" : "Predicted memory",
              "memory-bars", mem, "MiB", &peak);
    s += strf("<text x=\"10\" y=\"%.1f\" fill=\"#555\">* baseline. Throughput: mean tokens/s of the step records "
              "after the first 10%% of steps; memory: the predicted ledger total.</text>\n",
              y0 + h + 58);
    if (measured)
      s += strf("<text x=\"10\" y=\"%.1f\" fill=\"#555\">Peak RSS: the measured peak resident memory of the "
                "training process, binary and data included.</text>\n",
                y0 + h + 74);
  }
  s += "</svg>\n";
  return s;
}

}  // namespace mpt::compare
