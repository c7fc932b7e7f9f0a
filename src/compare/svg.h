// compare.svg: a self-contained picture of a Comparison, built as a string (docs/compare.md):
// validation loss against tokens, the difference from the baseline with the seed-noise band,
// and bars for throughput and memory.
#pragma once

#include <string>

#include "compare/compare.h"

namespace mpt::compare {

std::string render_svg(const Comparison& c);

// XML text or attribute value with &, <, >, " and ' escaped.
std::string xml_escape(const std::string& s);

}  // namespace mpt::compare
