#include "workers.h"

#include <cstring>

#include "../cuda/runtime.h"

namespace detinfer::binding {

DownloadWorker::DownloadWorker(Napi::Env env, const Tensor& tensor)
    : Napi::AsyncWorker(env, "detinfer.download"), tensor_(tensor), deferred_(Napi::Promise::Deferred::New(env)) {}

Napi::Promise DownloadWorker::Start(Napi::Env env, const Tensor& tensor) {
  auto* worker = new DownloadWorker(env, tensor);
  // The bytes read are those of the ops called before the download, never of a later one. CPU ops
  // run on the JS thread as they are called, so the bytes are read now; a CUDA copy of up to
  // kMaxStagedDownload bytes is enqueued now, on the stream, and waited for off the JS thread (a
  // larger one is enqueued by the worker: call it once the ops that must not change it are done).
  if (tensor.device() == Device::CPU) {
    worker->host_.resize(tensor.nbytes());
    std::memcpy(worker->host_.data(), tensor.data(), worker->host_.size());
  } else if (tensor.nbytes() > 0 && tensor.nbytes() <= cuda_runtime::kMaxStagedDownload) {
    try {
      worker->staged_ = cuda_runtime::download_begin(tensor.data(), tensor.nbytes());
    } catch (...) {
      delete worker;
      throw;
    }
  }
  Napi::Promise promise = worker->deferred_.Promise();
  worker->Queue();
  return promise;
}

void DownloadWorker::Execute() {
  try {
    if (tensor_.device() == Device::CUDA) {
      host_.resize(tensor_.nbytes());
      if (staged_) {
        void* staged = staged_;
        staged_ = nullptr;
        cuda_runtime::download_finish(staged, host_.data());
      } else {
        cuda_runtime::download(host_.data(), tensor_.data(), host_.size());
      }
    }
  } catch (const std::exception& e) {
    SetError(e.what());
  }
}

// OnOK and OnError run from the event loop after the work; when the environment is going away (a
// worker thread that exits with a download pending) making the buffer or settling the promise
// fails, and an exception escaping here would end the whole process: nothing is left to tell then.
void DownloadWorker::OnOK() {
  try {
    Napi::Env env = Env();
    Napi::Buffer<char> buf = Napi::Buffer<char>::Copy(env, host_.data(), host_.size());
    deferred_.Resolve(buf);
  } catch (...) {
  }
}

void DownloadWorker::OnError(const Napi::Error& e) {
  try {
    deferred_.Reject(e.Value());
  } catch (...) {
  }
}

SynchronizeWorker::SynchronizeWorker(Napi::Env env, Device device)
    : Napi::AsyncWorker(env, "detinfer.synchronize"), device_(device), deferred_(Napi::Promise::Deferred::New(env)) {}

Napi::Promise SynchronizeWorker::Start(Napi::Env env, Device device) {
  auto* worker = new SynchronizeWorker(env, device);
  Napi::Promise promise = worker->deferred_.Promise();
  worker->Queue();
  return promise;
}

void SynchronizeWorker::Execute() {
  try {
    if (device_ == Device::CUDA) cuda_runtime::synchronize();
  } catch (const std::exception& e) {
    SetError(e.what());
  }
}

void SynchronizeWorker::OnOK() {
  try {
    deferred_.Resolve(Env().Undefined());
  } catch (...) {
  }
}

void SynchronizeWorker::OnError(const Napi::Error& e) {
  try {
    deferred_.Reject(e.Value());
  } catch (...) {
  }
}

}  // namespace detinfer::binding
