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

  // A copy of the tensor behind a JS value (sharing its storage), or a TypeError naming the op and
  // the argument. A Tensor is recognized by a type tag set when it is made, so nothing of the value's
  // (a prototype, Symbol.hasInstance, a proxy) runs.
  static Tensor FromValue(const Napi::Value& value, const char* op, const char* name);

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
