// Exceptions turned into a Status at the library's boundary and in worker threads, so that none
// escapes the C++ API (out of memory above all).
#pragma once

#include <exception>
#include <new>
#include <string>

#include "tracin/tracin.hpp"

namespace tracin::detail {

// fn() -> Status, or the Status of the exception it threw.
template <class Fn>
Status Guarded(Fn&& fn) noexcept {
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    return {StatusCode::kOutOfMemory, "out of memory in the tracin kernel"};
  } catch (const std::exception& e) {
    return {StatusCode::kInternal, std::string("tracin kernel failed: ") + e.what()};
  } catch (...) {
    return {StatusCode::kInternal, "tracin kernel failed"};
  }
}

}  // namespace tracin::detail
