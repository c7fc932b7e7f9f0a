// Tensor: a non-owning, typed, contiguous view of backend memory (host memory on the CPU
// backend, device memory on the CUDA backend). Buffer: the owning, move-only allocation that
// views point into. Model code never allocates; it asks a backend for Buffers and cuts views.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <utility>

#include "core/dtype.h"
#include "core/error.h"

namespace mpt {

constexpr int kMaxDims = 4;

struct Shape {
  std::array<int64_t, kMaxDims> dims{};
  int ndim = 0;

  Shape() = default;
  Shape(std::initializer_list<int64_t> d) {
    MPT_CHECK(d.size() <= kMaxDims, "too many dimensions");
    for (int64_t v : d) dims[ndim++] = v;
  }
  int64_t operator[](int i) const { return dims[i]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= dims[i];
    return n;
  }
  bool operator==(const Shape& o) const {
    if (ndim != o.ndim) return false;
    for (int i = 0; i < ndim; ++i)
      if (dims[i] != o.dims[i]) return false;
    return true;
  }
  bool operator!=(const Shape& o) const { return !(*this == o); }
  std::string str() const {
    std::string s = "(";
    for (int i = 0; i < ndim; ++i) s += (i ? "," : "") + std::to_string(dims[i]);
    return s + ")";
  }
};

struct Tensor {
  void* data = nullptr;
  DType dtype = DType::f32;
  Shape shape;

  Tensor() = default;
  Tensor(void* d, DType t, Shape s) : data(d), dtype(t), shape(s) {}

  bool defined() const { return data != nullptr; }
  int64_t numel() const { return shape.numel(); }
  size_t bytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  int64_t dim(int i) const { return shape[i < 0 ? shape.ndim + i : i]; }

  template <typename T>
  T* as() const {
    MPT_CHECK(dtype == dtype_of<T>::value, std::string("tensor holds ") + dtype_name(dtype));
    return static_cast<T*>(data);
  }
  // The same memory seen with another shape of equal element count.
  Tensor reshape(Shape s) const {
    MPT_CHECK(s.numel() == numel(), "reshape " + shape.str() + " -> " + s.str());
    return Tensor(data, dtype, s);
  }
  // Elements [first, first + count) as a flat tensor.
  Tensor slice(int64_t first, int64_t count) const {
    MPT_CHECK(first >= 0 && count >= 0 && first + count <= numel(),
              "slice [" + std::to_string(first) + ", " + std::to_string(first + count) +
                  ") of " + shape.str());
    return Tensor(static_cast<char*>(data) + static_cast<size_t>(first) * dtype_size(dtype), dtype,
                  Shape{count});
  }
};

// Owning allocation made by a backend; the backend supplies the matching release function.
class Buffer {
 public:
  Buffer() = default;
  Buffer(void* ptr, size_t bytes, std::function<void(void*)> release)
      : ptr_(ptr), bytes_(bytes), release_(std::move(release)) {}
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept { swap(o); }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      Buffer tmp(std::move(o));
      swap(tmp);
    }
    return *this;
  }
  ~Buffer() {
    if (ptr_ && release_) release_(ptr_);
  }

  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }

  // A view of `shape` starting `offset_bytes` into the buffer.
  Tensor view(size_t offset_bytes, DType dtype, Shape shape) const {
    Tensor t(static_cast<char*>(ptr_) + offset_bytes, dtype, shape);
    MPT_CHECK(offset_bytes + t.bytes() <= bytes_, "view " + shape.str() + " past end of buffer");
    return t;
  }

 private:
  void swap(Buffer& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    std::swap(release_, o.release_);
  }
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  std::function<void(void*)> release_;
};

}  // namespace mpt
