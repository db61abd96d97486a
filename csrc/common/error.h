// Errors raised by the native layer. Nothing here aborts the process: every failure is a C++
// exception that the binding turns into a JS exception with the same message.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace detinfer {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

namespace detail {
inline void append(std::ostringstream&) {}
template <typename T, typename... Rest>
void append(std::ostringstream& os, const T& first, const Rest&... rest) {
  os << first;
  append(os, rest...);
}
}  // namespace detail

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  detail::append(os, parts...);
  throw Error(os.str());
}

}  // namespace detinfer

// DI_CHECK(cond, "message parts", ...): throws detinfer::Error when cond is false.
#define DI_CHECK(cond, ...)                     \
  do {                                          \
    if (!(cond)) ::detinfer::fail(__VA_ARGS__); \
  } while (0)
