// How an error message shows a JS value it refuses: from its type and, for numbers, strings and
// booleans, its value. Nothing here runs JS (no toString, no getters, no proxy traps), so a message
// can be made about any value, and a value cannot change anything while an op reads its arguments.
#pragma once

#include <napi.h>

#include <cmath>
#include <sstream>
#include <string>

namespace detinfer::binding {

inline std::string describe_js(const Napi::Value& v) {
  switch (v.Type()) {
    case napi_undefined:
      return "undefined";
    case napi_null:
      return "null";
    case napi_boolean:
      return v.As<Napi::Boolean>().Value() ? "true" : "false";
    case napi_number: {
      const double d = v.As<Napi::Number>().DoubleValue();
      if (std::isnan(d)) return "NaN";
      if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
      std::ostringstream os;
      os.precision(17);
      os << d;
      return os.str();
    }
    case napi_string: {
      std::string s = v.As<Napi::String>().Utf8Value();
      if (s.size() > 60) s = s.substr(0, 60) + "...";
      return "\"" + s + "\"";
    }
    case napi_symbol:
      return "a symbol";
    case napi_bigint:
      return "a bigint";
    case napi_function:
      return "a function";
    case napi_external:
      return "an external";
    case napi_object:
      if (v.IsArray()) return "an array";
      if (v.IsTypedArray()) return "a typed array";
      if (v.IsArrayBuffer()) return "an ArrayBuffer";
      return "an object";
    default:
      return "a value";
  }
}

}  // namespace detinfer::binding
