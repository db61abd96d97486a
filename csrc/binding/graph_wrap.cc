#include "graph_wrap.h"

#include "../cuda/runtime.h"
#include "instance_data.h"

namespace detinfer::binding {
namespace {
struct Captured {
  void* exec;
  size_t bytes;
};
}  // namespace

Napi::Function GraphWrap::Init(Napi::Env env) {
  return DefineClass(env, "Graph",
                     {
                         InstanceAccessor<&GraphWrap::Bytes>("bytes"),
                         InstanceAccessor<&GraphWrap::Disposed>("disposed"),
                         InstanceMethod<&GraphWrap::Replay>("replay"),
                         InstanceMethod<&GraphWrap::Dispose>("dispose"),
                     });
}

Napi::Object GraphWrap::New(Napi::Env env, void* exec, size_t bytes) {
  Captured captured{exec, bytes};
  try {
    Napi::External<Captured> ext = Napi::External<Captured>::New(env, &captured);
    return instance_data(env).graph.New({ext});
  } catch (...) {
    // The constructor takes ownership only once it has run; before that the graph is still ours.
    if (captured.exec != nullptr) cuda_runtime::graph_destroy(captured.exec);
    throw;
  }
}

GraphWrap::GraphWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<GraphWrap>(info) {
  if (info.Length() != 1 || !info[0].IsExternal()) {
    Napi::TypeError::New(info.Env(), "Graph cannot be constructed directly; use graphBegin() and graphEnd()")
        .ThrowAsJavaScriptException();
    return;
  }
  Captured* captured = info[0].As<Napi::External<Captured>>().Data();
  exec_ = captured->exec;
  bytes_ = captured->bytes;
  captured->exec = nullptr;  // owned here now
}

GraphWrap::~GraphWrap() { cuda_runtime::graph_destroy(exec_); }

Napi::Value GraphWrap::Bytes(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(bytes_));
}

Napi::Value GraphWrap::Disposed(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), exec_ == nullptr);
}

Napi::Value GraphWrap::Replay(const Napi::CallbackInfo& info) {
  if (exec_ == nullptr) throw Napi::Error::New(info.Env(), "The CUDA graph was disposed and cannot be used any more");
  cuda_runtime::graph_launch(exec_);
  return info.Env().Undefined();
}

Napi::Value GraphWrap::Dispose(const Napi::CallbackInfo& info) {
  void* exec = exec_;
  exec_ = nullptr;
  cuda_runtime::graph_destroy(exec);
  return info.Env().Undefined();
}

}  // namespace detinfer::binding
