#include "tensor_wrap.h"

#include "describe.h"
#include "instance_data.h"

namespace detinfer::binding {
namespace {
// Marks the objects that are Tensors of this addon (napi_type_tag_object): random, fixed.
constexpr napi_type_tag kTensorTag = {0x6a1c5e9b03d24f87ULL, 0xb2e07c4d9a6f1385ULL};
}  // namespace

Napi::Function TensorWrap::Init(Napi::Env env) {
  return DefineClass(env, "Tensor",
                                    {
                                        InstanceAccessor<&TensorWrap::Dtype>("dtype"),
                                        InstanceAccessor<&TensorWrap::Device>("device"),
                                        InstanceAccessor<&TensorWrap::Shape>("shape"),
                                        InstanceAccessor<&TensorWrap::Nbytes>("nbytes"),
                                        InstanceAccessor<&TensorWrap::Disposed>("disposed"),
                                        InstanceMethod<&TensorWrap::Dispose>("dispose"),
                                    });
}

Napi::Object TensorWrap::New(Napi::Env env, Tensor tensor) {
  auto* holder = new Tensor(std::move(tensor));
  Napi::External<Tensor> ext = Napi::External<Tensor>::New(env, holder);
  Napi::Object obj = instance_data(env).tensor.New({ext});
  delete holder;
  return obj;
}

TensorWrap::TensorWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TensorWrap>(info) {
  if (info.Length() != 1 || !info[0].IsExternal()) {
    Napi::TypeError::New(info.Env(), "Tensor cannot be constructed directly; use detinfer's tensor functions")
        .ThrowAsJavaScriptException();
    return;
  }
  tensor_ = *info[0].As<Napi::External<Tensor>>().Data();
  info.This().As<Napi::Object>().TypeTag(&kTensorTag);
}

Tensor TensorWrap::FromValue(const Napi::Value& value, const char* op, const char* name) {
  Napi::Env env = value.Env();
  if (!value.IsObject() || !value.As<Napi::Object>().CheckTypeTag(&kTensorTag))
    throw Napi::TypeError::New(env, std::string(op) + ": expected a Tensor for " + name + " but received " + describe_js(value));
  TensorWrap* wrap = ObjectWrap<TensorWrap>::Unwrap(value.As<Napi::Object>());
  if (!wrap->tensor_) throw Napi::Error::New(env, std::string(op) + ": tensor " + name + " was disposed");
  return *wrap->tensor_;
}

Tensor& TensorWrap::Get(const char* what) {
  if (!tensor_) throw Napi::Error::New(Env(), std::string("cannot read ") + what + " of a disposed tensor");
  return *tensor_;
}

Napi::Value TensorWrap::Dtype(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), dtype_name(Get("dtype").dtype));
}

Napi::Value TensorWrap::Device(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), device_name(Get("device").device()));
}

Napi::Value TensorWrap::Shape(const Napi::CallbackInfo& info) {
  Tensor& t = Get("shape");
  Napi::Array arr = Napi::Array::New(info.Env(), t.shape.size());
  for (size_t i = 0; i < t.shape.size(); ++i) arr[i] = Napi::Number::New(info.Env(), static_cast<double>(t.shape[i]));
  return arr;
}

Napi::Value TensorWrap::Nbytes(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(Get("nbytes").nbytes()));
}

Napi::Value TensorWrap::Disposed(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), !tensor_.has_value());
}

Napi::Value TensorWrap::Dispose(const Napi::CallbackInfo& info) {
  tensor_.reset();
  return info.Env().Undefined();
}

}  // namespace detinfer::binding
