// Reading JS arguments for the op functions. Every mismatch is a TypeError naming the op, the
// argument, what was expected and what was received.
#pragma once

#include <napi.h>

#include <deque>
#include <string>
#include <vector>

#include "describe.h"
#include "tensor_wrap.h"

namespace detinfer::binding {

struct Args {
  const Napi::CallbackInfo& info;
  const char* op;
  // The tensors of this call, copied as they are read: each holds its storage until the op returns,
  // whatever JS runs meanwhile (a getter of a later argument that disposes an earlier one).
  mutable std::deque<Tensor> held{};

  Napi::Env env() const { return info.Env(); }

  [[noreturn]] void type_error(size_t i, const char* name, const char* expected) const {
    value_error(i < info.Length() ? info[i] : env().Undefined(), name, expected);
  }

  [[noreturn]] void value_error(const Napi::Value& v, const char* name, const char* expected) const {
    throw Napi::TypeError::New(env(), std::string(op) + ": expected " + expected + " for " + name +
                                          " but received " + describe_js(v));
  }

  Tensor& tensor(size_t i, const char* name) const {
    return held.emplace_back(TensorWrap::FromValue(i < info.Length() ? info[i] : env().Undefined(), op, name));
  }

  Tensor& tensor_value(const Napi::Value& v, const char* name) const {
    return held.emplace_back(TensorWrap::FromValue(v, op, name));
  }

  const Tensor* optional_tensor(size_t i, const char* name) const {
    if (i >= info.Length() || info[i].IsNull() || info[i].IsUndefined()) return nullptr;
    return &tensor(i, name);
  }

  double number(size_t i, const char* name) const {
    if (i >= info.Length() || !info[i].IsNumber()) type_error(i, name, "a number");
    return info[i].As<Napi::Number>().DoubleValue();
  }

  int integer(size_t i, const char* name) const {
    return integer_value(i < info.Length() ? info[i] : env().Undefined(), name);
  }

  // A 32-bit integer (not NaN, not Infinity, not wrapped around).
  int integer_value(const Napi::Value& v, const char* name) const {
    if (!v.IsNumber()) value_error(v, name, "an integer");
    const double d = v.As<Napi::Number>().DoubleValue();
    if (!(d >= -2147483648.0 && d <= 2147483647.0) || d != static_cast<double>(static_cast<int>(d)))
      value_error(v, name, "an integer");
    return static_cast<int>(d);
  }

  bool boolean(size_t i, const char* name) const {
    if (i >= info.Length() || !info[i].IsBoolean()) type_error(i, name, "a boolean");
    return info[i].As<Napi::Boolean>().Value();
  }

  std::string string(size_t i, const char* name) const {
    if (i >= info.Length() || !info[i].IsString()) type_error(i, name, "a string");
    return info[i].As<Napi::String>().Utf8Value();
  }

  std::vector<int64_t> shape(size_t i, const char* name) const {
    if (i >= info.Length() || !info[i].IsArray()) type_error(i, name, "an array of non-negative integers");
    Napi::Array arr = info[i].As<Napi::Array>();
    std::vector<int64_t> dims;
    for (uint32_t k = 0; k < arr.Length(); ++k) {
      Napi::Value v = arr[k];
      double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : -1;
      if (d < 0 || d != static_cast<double>(static_cast<int64_t>(d)) || d > 9.0e15)
        type_error(i, name, "an array of non-negative integers");
      dims.push_back(static_cast<int64_t>(d));
    }
    return dims;
  }

  Napi::Object object(size_t i, const char* name) const {
    if (i >= info.Length() || !info[i].IsObject()) type_error(i, name, "an object");
    return info[i].As<Napi::Object>();
  }
};

}  // namespace detinfer::binding
