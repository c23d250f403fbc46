// The sparse top-down kernel reads its weight packed ([chunk][c_out][tap][cw], see
// sparse_top_down.h). Packing is a pass over the weight that costs up to as much as the
// top-down itself (measured on VGG-5's 512 -> 512 layer at batch 32), and relaxation calls the
// op hundreds of times with one weight, so packings are kept here rather than made per call or
// passed in by the caller (the op's schema knows nothing of them).
//
// A packing is reused only for a weight whose bytes equal, byte for byte, those it was made
// from (a stored copy is compared, memcmp): whatever changed the weight (an optimizer step,
// an edit through .data that no version counter sees, another tensor with other values), a
// different weight never gets a stale packing. The comparison reads the weight twice, a few
// percent of the top-down's cost. Entries are kept most recently used first, at most
// kMaxEntries and kMaxBytes of copies and packings; a mutex serialises lookups.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <list>
#include <mutex>

namespace ep_kernels {
namespace cpu {

class PackedWeightCache {
 public:
  template <typename Pack>
  at::Tensor get(const at::Tensor& weight, Pack pack) {
    const at::Tensor w = weight.contiguous();
    const size_t nbytes = static_cast<size_t>(w.numel()) * w.element_size();
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = entries_.begin(); it != entries_.end(); ++it) {
        if (it->copy.scalar_type() == w.scalar_type() && it->copy.sizes() == w.sizes() &&
            std::memcmp(it->copy.const_data_ptr(), w.const_data_ptr(), nbytes) == 0) {
          entries_.splice(entries_.begin(), entries_, it);
          return entries_.front().packed;
        }
      }
    }
    // Outside the lock: packing may use the thread pool. The copy is taken before packing, so
    // it holds the bytes the packing was made from.
    at::Tensor copy = w.clone();
    at::Tensor packed = pack(copy);
    std::lock_guard<std::mutex> lock(mu_);
    entries_.push_front(Entry{copy, packed});
    bytes_ += entry_bytes(entries_.front());
    while (entries_.size() > kMaxEntries || (bytes_ > kMaxBytes && entries_.size() > 1)) {
      bytes_ -= entry_bytes(entries_.back());
      entries_.pop_back();
    }
    return packed;
  }

 private:
  static constexpr size_t kMaxEntries = 64;                 // more conv layers than any network relaxed at once
  static constexpr size_t kMaxBytes = size_t(512) << 20;    // copies + packings

  struct Entry {
    at::Tensor copy, packed;
  };

  static size_t entry_bytes(const Entry& e) {
    return static_cast<size_t>(e.copy.numel()) * e.copy.element_size() +
           static_cast<size_t>(e.packed.numel()) * e.packed.element_size();
  }

  std::mutex mu_;
  std::list<Entry> entries_;
  size_t bytes_ = 0;
};

}  // namespace cpu
}  // namespace ep_kernels
