// The JS Tensor class: a handle on a native Tensor. dispose() releases the memory at once; a
// finalizer releases it if the handle is garbage collected first.
#pragma once

#include <napi.h>

#include <optional>

#include "../common/tensor.h"

namespace detinfer::binding {

class TensorWrap : public Napi::ObjectWrap<TensorWrap> {
 public:
  static Napi::Function Init(Napi::Env env);
  static Napi::Object New(Napi::Env env, Tensor tensor);
  explicit TensorWrap(const Napi::CallbackInfo& info);

  // The tensor behind a JS value, or a TypeError naming the op and the argument.
  static Tensor& FromValue(const Napi::Value& value, const char* op, const char* name);

 private:
  Napi::Value Dtype(const Napi::CallbackInfo& info);
  Napi::Value Device(const Napi::CallbackInfo& info);
  Napi::Value Shape(const Napi::CallbackInfo& info);
  Napi::Value Nbytes(const Napi::CallbackInfo& info);
  Napi::Value Disposed(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Tensor& Get(const char* what);

  std::optional<Tensor> tensor_;
};

}  // namespace detinfer::binding
