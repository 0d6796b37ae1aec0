// Tensor: contiguous, row-major, one dtype, one device. Storage is shared by views of rows, so a
// view is cheap and keeps its parent's memory alive. Memory from outside (a numpy array) is
// wrapped without a copy; the wrapper holds whatever keeps that memory alive.
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "core/error.hpp"

namespace hybrit {

enum class DType : uint8_t { f32, f64, bf16, i8, i32, i64, u8, ternary2 };
// ternary2: packed ternary weights, four 2-bit codes per byte (see backends/README.md).

size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<double>() { return DType::f64; }
template <> constexpr DType dtype_of<int8_t>() { return DType::i8; }
template <> constexpr DType dtype_of<int32_t>() { return DType::i32; }
template <> constexpr DType dtype_of<int64_t>() { return DType::i64; }
template <> constexpr DType dtype_of<uint8_t>() { return DType::u8; }

struct Device {
  enum class Type : uint8_t { cpu, cuda };
  Type type = Type::cpu;
  int index = 0;

  static Device cpu() { return {}; }
  static Device cuda(int index = 0) { return {Type::cuda, index}; }
  bool is_cpu() const { return type == Type::cpu; }
  bool is_cuda() const { return type == Type::cuda; }
  std::string str() const;
  // Spelled out (not defaulted) because the CUDA sources are compiled as C++17.
  friend bool operator==(const Device& a, const Device& b) { return a.type == b.type && a.index == b.index; }
  friend bool operator!=(const Device& a, const Device& b) { return !(a == b); }
};

// How memory on a device other than the host is made, freed and copied. The CUDA backend
// registers these, so core never links CUDA.
struct DeviceMemoryOps {
  void* (*allocate)(size_t bytes, int device_index) = nullptr;
  void (*release)(void* pointer, int device_index) = nullptr;
  // Copies bytes between any two of (host, device); directions are given by the two Devices.
  void (*copy)(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes) = nullptr;
};
void register_cuda_memory(const DeviceMemoryOps& ops);
bool cuda_memory_registered();

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& shape);

class Tensor {
 public:
  Tensor() = default;

  static Tensor empty(Shape shape, DType dtype, Device device = Device::cpu());
  static Tensor zeros(Shape shape, DType dtype, Device device = Device::cpu());
  // Host memory owned elsewhere; `owner` keeps it alive for as long as this tensor lives.
  static Tensor wrap(void* data, Shape shape, DType dtype, std::shared_ptr<void> owner);

  const Shape& shape() const { return shape_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int axis) const;
  int64_t numel() const { return numel_; }
  size_t nbytes() const { return static_cast<size_t>(numel_) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  bool defined() const { return storage_ != nullptr || numel_ == 0; }

  void* raw() { return offset_bytes(); }
  const void* raw() const { return const_cast<Tensor*>(this)->offset_bytes(); }
  template <class T> T* data() { check_dtype(dtype_of<T>()); return static_cast<T*>(raw()); }
  template <class T> const T* data() const { check_dtype(dtype_of<T>()); return static_cast<const T*>(raw()); }

  // Rows [begin, end) along the first axis, sharing storage.
  Tensor rows(int64_t begin, int64_t end) const;
  // Same storage, another shape with the same number of elements.
  Tensor reshape(Shape shape) const;
  // A copy on `device` (a plain copy when already there).
  Tensor to(Device device) const;
  Tensor clone() const { return to(device_); }

  void check_dtype(DType expected) const;

 private:
  void* offset_bytes() const { return static_cast<char*>(storage_.get()) + offset_; }

  std::shared_ptr<void> storage_;
  size_t offset_ = 0;
  Shape shape_;
  int64_t numel_ = 0;
  DType dtype_ = DType::f32;
  Device device_;
};

}  // namespace hybrit
