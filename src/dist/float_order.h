// Floats as unsigned integers in the same order, for a NaN-propagating max over NCCL.
//
// ncclMax on ncclFloat reduces with fmaxf (NVIDIA/nccl src/device/reduce_kernel.h), which
// returns the number when one operand is NaN: a NaN amax on one rank would vanish in the max
// over ranks, and that rank's overflow with it. The communicator's contract (communicator.h:
// "NaN wins") is kept by reducing keys instead: key(x) is a uint32 that orders like x, with every
// NaN mapped above +inf, so ncclMax on ncclUint32 (plain integer compare) is the NaN-propagating
// max, one collective, elementwise. -0 orders below +0 (max(-0, +0) is +0); a NaN comes back as
// the canonical quiet NaN (0x7FC00000), as the MPI communicator's max returns it.
//
// Header-only, host and device: tests check the mapping on the CPU.
#pragma once

#include <cstdint>

#include "core/formats.h"

namespace mpt::dist {

constexpr uint32_t kNanOrderKey = 0xFFFFFFFFu;

// On the bits of an fp32 value.
MPT_HOST_DEVICE inline uint32_t order_key_of_bits(uint32_t b) {
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return kNanOrderKey;  // every NaN, either sign
  // Non-negative floats order like their bits: set the top bit to put them above the negatives.
  // Negative floats order in reverse of their bits: complement them (the top bit becomes 0).
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

MPT_HOST_DEVICE inline uint32_t bits_of_order_key(uint32_t k) {
  if (k == kNanOrderKey) return 0x7FC00000u;
  return (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k;
}

MPT_HOST_DEVICE inline uint32_t float_order_key(float x) {
  return order_key_of_bits(detail::float_to_bits(x));
}

MPT_HOST_DEVICE inline float float_from_order_key(uint32_t k) {
  return detail::bits_to_float(bits_of_order_key(k));
}

}  // namespace mpt::dist
