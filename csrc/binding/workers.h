// Work that waits for the device runs off the JS thread: reading a tensor back, synchronizing.
// Each returns a promise; a failure (a CUDA error, say) rejects it with the message.
#pragma once

#include <napi.h>

#include <vector>

#include "../common/tensor.h"

namespace detinfer::binding {

class DownloadWorker : public Napi::AsyncWorker {
 public:
  static Napi::Promise Start(Napi::Env env, const Tensor& tensor);

 private:
  DownloadWorker(Napi::Env env, const Tensor& tensor);
  void Execute() override;
  void OnOK() override;
  void OnError(const Napi::Error& e) override;

  Tensor tensor_;  // holds the storage alive until the copy is done
  std::vector<char> host_;
  void* staged_ = nullptr;  // a CUDA copy enqueued at Start (cuda_runtime::download_begin)
  Napi::Promise::Deferred deferred_;
};

class SynchronizeWorker : public Napi::AsyncWorker {
 public:
  static Napi::Promise Start(Napi::Env env, Device device);

 private:
  SynchronizeWorker(Napi::Env env, Device device);
  void Execute() override;
  void OnOK() override;
  void OnError(const Napi::Error& e) override;

  Device device_;
  Napi::Promise::Deferred deferred_;
};

}  // namespace detinfer::binding
