// The JS handle on a CUDA graph captured from the stream (graphBegin/graphEnd): replay() launches
// it, dispose() destroys it at once; a finalizer destroys it if the handle is garbage collected first.
#pragma once

#include <napi.h>

#include <cstddef>

namespace detinfer::binding {

class GraphWrap : public Napi::ObjectWrap<GraphWrap> {
 public:
  static Napi::Function Init(Napi::Env env);
  // Takes ownership of exec (a cudaGraphExec_t): it is destroyed even if making the handle fails.
  static Napi::Object New(Napi::Env env, void* exec, size_t bytes);
  explicit GraphWrap(const Napi::CallbackInfo& info);
  ~GraphWrap() override;

 private:
  Napi::Value Bytes(const Napi::CallbackInfo& info);
  Napi::Value Disposed(const Napi::CallbackInfo& info);
  Napi::Value Replay(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);

  void* exec_ = nullptr;  // nullptr once disposed
  size_t bytes_ = 0;
};

}  // namespace detinfer::binding
