// The op functions exposed to JS: read the arguments, call detinfer::ops, return. Errors thrown by
// the ops (detinfer::Error) become JS exceptions through NODE_ADDON_API_CPP_EXCEPTIONS_ALL.
#include "ops_binding.h"

#include <cstring>

#include "../common/config.h"
#include "../cuda/runtime.h"
#include "../ops.h"
#include "args.h"
#include "graph_wrap.h"
#include "workers.h"

namespace detinfer::binding {
namespace {

Napi::Value Empty(const Napi::CallbackInfo& info) {
  Args a{info, "empty"};
  Device device = parse_device(a.string(0, "device"));
  DType dtype = parse_dtype(a.string(1, "dtype"));
  return TensorWrap::New(info.Env(), make_tensor(device, dtype, a.shape(2, "shape")));
}

// Copies host bytes (a TypedArray or Buffer of exactly nbytes) into an existing tensor; to a CUDA
// tensor either waiting for the copy or, when async, through the pinned staging ring without waiting.
void UploadInto(const Args& a, Tensor& t, size_t arg, bool async = false) {
  if (arg >= a.info.Length() || !a.info[arg].IsTypedArray()) a.type_error(arg, "data", "a TypedArray or Buffer");
  // The bytes through napi_get_typedarray_info, which also takes a view of a SharedArrayBuffer.
  napi_typedarray_type type;
  size_t length = 0, offset = 0;
  void* data = nullptr;
  NAPI_THROW_IF_FAILED_VOID(a.env(), napi_get_typedarray_info(a.env(), a.info[arg], &type, &length, &data, nullptr, &offset));
  Napi::TypedArray ta = a.info[arg].As<Napi::TypedArray>();
  size_t nbytes = ta.ByteLength();
  if (nbytes != t.nbytes())
    fail(a.op, ": expected ", t.nbytes(), " bytes of data for ", t.describe(), " but received ", nbytes);
  if (nbytes > 0 && data == nullptr) a.type_error(arg, "data", "a TypedArray whose buffer is not detached");
  const char* src = static_cast<const char*>(data);
  if (t.device() == Device::CPU) {
    std::memcpy(t.data(), src, nbytes);
  } else if (async) {
    cuda_runtime::upload_async(t.data(), src, nbytes);
  } else {
    cuda_runtime::upload(t.data(), src, nbytes);
  }
}

Napi::Value FromBuffer(const Napi::CallbackInfo& info) {
  Args a{info, "fromBuffer"};
  Device device = parse_device(a.string(0, "device"));
  DType dtype = parse_dtype(a.string(1, "dtype"));
  Tensor t = make_tensor(device, dtype, a.shape(2, "shape"));
  UploadInto(a, t, 3);
  return TensorWrap::New(info.Env(), t);
}

Napi::Value Upload(const Napi::CallbackInfo& info) {
  Args a{info, "upload"};
  UploadInto(a, a.tensor(0, "tensor"), 1);
  return info.Env().Undefined();
}

Napi::Value UploadAsync(const Napi::CallbackInfo& info) {
  Args a{info, "uploadAsync"};
  UploadInto(a, a.tensor(0, "tensor"), 1, true);
  return info.Env().Undefined();
}

Napi::Value GraphBegin(const Napi::CallbackInfo& info) {
  cuda_runtime::capture_begin();
  return info.Env().Undefined();
}

Napi::Value GraphEnd(const Napi::CallbackInfo& info) {
  size_t bytes = 0;
  void* exec = cuda_runtime::capture_end(&bytes);
  return GraphWrap::New(info.Env(), exec, bytes);
}

Napi::Value MemoryInfo(const Napi::CallbackInfo& info) {
  size_t free_bytes = 0, total_bytes = 0;
  cuda_runtime::memory_info(&free_bytes, &total_bytes);
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("free", static_cast<double>(free_bytes));
  o.Set("total", static_cast<double>(total_bytes));
  o.Set("decodeWorkspace", static_cast<double>(ops::cuda_decode_workspace_bytes()));
  return o;
}

Napi::Value GraphAbort(const Napi::CallbackInfo& info) {
  cuda_runtime::require();
  cuda_runtime::capture_abort();
  return info.Env().Undefined();
}

Napi::Value Download(const Napi::CallbackInfo& info) {
  Args a{info, "download"};
  return DownloadWorker::Start(info.Env(), a.tensor(0, "tensor"));
}

Napi::Value Synchronize(const Napi::CallbackInfo& info) {
  Args a{info, "synchronize"};
  return SynchronizeWorker::Start(info.Env(), parse_device(a.string(0, "device")));
}

Napi::Value View(const Napi::CallbackInfo& info) {
  Args a{info, "view"};
  return TensorWrap::New(info.Env(), reshape(a.tensor(0, "tensor"), a.shape(1, "shape")));
}

Napi::Value Narrow(const Napi::CallbackInfo& info) {
  Args a{info, "narrow"};
  return TensorWrap::New(info.Env(), narrow_rows(a.tensor(0, "tensor"), a.integer(1, "start"), a.integer(2, "count")));
}

Napi::Value Embedding(const Napi::CallbackInfo& info) {
  Args a{info, "embedding"};
  ops::embedding(a.tensor(0, "out"), a.tensor(1, "table"), a.tensor(2, "ids"));
  return info.Env().Undefined();
}

Napi::Value Rmsnorm(const Napi::CallbackInfo& info) {
  Args a{info, "rmsnorm"};
  ops::rmsnorm(a.tensor(0, "out"), a.tensor(1, "x"), a.tensor(2, "w"), static_cast<float>(a.number(3, "eps")));
  return info.Env().Undefined();
}

Napi::Value AddRmsnorm(const Napi::CallbackInfo& info) {
  Args a{info, "addRmsnorm"};
  ops::add_rmsnorm(a.tensor(0, "out"), a.tensor(1, "residual"), a.tensor(2, "x"), a.tensor(3, "w"),
                   static_cast<float>(a.number(4, "eps")));
  return info.Env().Undefined();
}

Napi::Value Matmul(const Napi::CallbackInfo& info) {
  Args a{info, "matmul"};
  ops::matmul(a.tensor(0, "out"), a.tensor(1, "a"), a.tensor(2, "w"), a.optional_tensor(3, "bias"));
  return info.Env().Undefined();
}

Napi::Value MatmulPartitioned(const Napi::CallbackInfo& info) {
  Args a{info, "matmulPartitioned"};
  ops::matmul_partitioned(a.tensor(0, "out"), a.tensor(1, "a"), a.tensor(2, "w"), a.optional_tensor(3, "bias"));
  return info.Env().Undefined();
}

Napi::Value MatmulPartials(const Napi::CallbackInfo& info) {
  Args a{info, "matmulPartials"};
  ops::matmul_partials(a.tensor(0, "partials"), a.tensor(1, "a"), a.tensor(2, "w"));
  return info.Env().Undefined();
}

Napi::Value CombinePartials(const Napi::CallbackInfo& info) {
  Args a{info, "combinePartials"};
  ops::combine_partials(a.tensor(0, "out"), a.tensor(1, "partials"), a.optional_tensor(2, "bias"),
                        a.integer(3, "ranks"));
  return info.Env().Undefined();
}

Napi::Value Rope(const Napi::CallbackInfo& info) {
  Args a{info, "rope"};
  ops::rope(a.tensor(0, "x"), a.tensor(1, "positions"), a.tensor(2, "cosSin"));
  return info.Env().Undefined();
}

Napi::Value SiluMul(const Napi::CallbackInfo& info) {
  Args a{info, "siluMul"};
  ops::silu_mul(a.tensor(0, "out"), a.tensor(1, "gate"), a.tensor(2, "up"));
  return info.Env().Undefined();
}

Napi::Value SiluMulPacked(const Napi::CallbackInfo& info) {
  Args a{info, "siluMulPacked"};
  ops::silu_mul_packed(a.tensor(0, "out"), a.tensor(1, "gateUp"));
  return info.Env().Undefined();
}

Napi::Value MatmulSiluMul(const Napi::CallbackInfo& info) {
  Args a{info, "matmulSiluMul"};
  ops::matmul_silu_mul(a.tensor(0, "out"), a.tensor(1, "gateUp"), a.tensor(2, "a"), a.tensor(3, "w"),
                       a.optional_tensor(4, "bias"));
  return info.Env().Undefined();
}

Napi::Value NormMatmul(const Napi::CallbackInfo& info) {
  Args a{info, "normMatmul"};
  ops::norm_matmul(a.tensor(0, "out"), a.tensor(1, "normed"), a.tensor(2, "residualOut"), a.tensor(3, "residualIn"),
                   a.optional_tensor(4, "x"), a.tensor(5, "normW"), static_cast<float>(a.number(6, "eps")),
                   a.tensor(7, "w"), a.optional_tensor(8, "bias"));
  return info.Env().Undefined();
}

Napi::Value NormMatmulSiluMul(const Napi::CallbackInfo& info) {
  Args a{info, "normMatmulSiluMul"};
  ops::norm_matmul_silu_mul(a.tensor(0, "out"), a.tensor(1, "gateUp"), a.tensor(2, "normed"),
                            a.tensor(3, "residualOut"), a.tensor(4, "residualIn"), a.optional_tensor(5, "x"),
                            a.tensor(6, "normW"), static_cast<float>(a.number(7, "eps")), a.tensor(8, "w"),
                            a.optional_tensor(9, "bias"));
  return info.Env().Undefined();
}

Napi::Value Add(const Napi::CallbackInfo& info) {
  Args a{info, "add"};
  ops::add(a.tensor(0, "out"), a.tensor(1, "a"), a.tensor(2, "b"));
  return info.Env().Undefined();
}

Napi::Value KvAppend(const Napi::CallbackInfo& info) {
  Args a{info, "kvAppend"};
  ops::kv_append(a.tensor(0, "kCache"), a.tensor(1, "vCache"), a.tensor(2, "k"), a.tensor(3, "v"),
                 a.tensor(4, "slots"));
  return info.Env().Undefined();
}

Napi::Value QkvRopeAppend(const Napi::CallbackInfo& info) {
  Args a{info, "qkvRopeAppend"};
  ops::qkv_rope_append(a.tensor(0, "qOut"), a.tensor(1, "kCache"), a.tensor(2, "vCache"), a.tensor(3, "qkv"),
                       a.tensor(4, "positions"), a.tensor(5, "cosSin"), a.tensor(6, "slots"),
                       a.optional_tensor(7, "qNorm"), a.optional_tensor(8, "kNorm"),
                       static_cast<float>(a.number(9, "eps")));
  return info.Env().Undefined();
}

Napi::Value Attention(const Napi::CallbackInfo& info) {
  Args a{info, "attention"};
  Napi::Object batch = a.object(4, "batch");
  AttentionBatch b;
  b.block_tables = a.tensor_value(batch.Get("blockTables"), "batch.blockTables");
  b.query_start = a.tensor_value(batch.Get("queryStart"), "batch.queryStart");
  b.seq_lens = a.tensor_value(batch.Get("seqLens"), "batch.seqLens");
  b.max_query_len = a.integer_value(batch.Get("maxQueryLen"), "batch.maxQueryLen");
  b.max_seq_len = a.integer_value(batch.Get("maxSeqLen"), "batch.maxSeqLen");
  ops::attention(a.tensor(0, "out"), a.tensor(1, "q"), a.tensor(2, "kCache"), a.tensor(3, "vCache"), b,
                 static_cast<float>(a.number(5, "scale")), a.optional_tensor(6, "workspace"));
  return info.Env().Undefined();
}

Napi::Value LogSoftmax(const Napi::CallbackInfo& info) {
  Args a{info, "logSoftmax"};
  ops::log_softmax(a.tensor(0, "out"), a.tensor(1, "x"));
  return info.Env().Undefined();
}

Napi::Value Argmax(const Napi::CallbackInfo& info) {
  Args a{info, "argmax"};
  ops::argmax(a.tensor(0, "out"), a.tensor(1, "x"));
  return info.Env().Undefined();
}

Napi::Value TokenLogprobs(const Napi::CallbackInfo& info) {
  Args a{info, "tokenLogprobs"};
  ops::token_logprobs(a.tensor(0, "out"), a.tensor(1, "x"), a.tensor(2, "ids"));
  return info.Env().Undefined();
}

Napi::Value ChooseTokens(const Napi::CallbackInfo& info) {
  Args a{info, "chooseTokens"};
  ops::choose_tokens(a.tensor(0, "out"), a.tensor(1, "x"), a.tensor(2, "params"), a.optional_tensor(3, "live"));
  return info.Env().Undefined();
}

Napi::Value ApplyLogitProcessors(const Napi::CallbackInfo& info) {
  Args a{info, "applyLogitProcessors"};
  ops::apply_logit_processors(a.tensor(0, "adjusted"), a.tensor(1, "adjustedParams"), a.tensor(2, "counts"),
                              a.tensor(3, "x"), a.tensor(4, "params"), a.tensor(5, "plan"), a.tensor(6, "settings"),
                              a.tensor(7, "mask"));
  return info.Env().Undefined();
}

Napi::Value RecordLogitChoices(const Napi::CallbackInfo& info) {
  Args a{info, "recordLogitChoices"};
  ops::record_logit_choices(a.tensor(0, "params"), a.tensor(1, "counts"), a.tensor(2, "chosen"), a.tensor(3, "plan"));
  return info.Env().Undefined();
}

Napi::Value ResetLogitRow(const Napi::CallbackInfo& info) {
  Args a{info, "resetLogitRow"};
  ops::reset_logit_row(a.tensor(0, "counts"), a.integer(1, "row"), a.tensor(2, "prompt"));
  return info.Env().Undefined();
}

Napi::Value Copy(const Napi::CallbackInfo& info) {
  Args a{info, "copy"};
  ops::copy(a.tensor(0, "dst"), a.tensor(1, "src"));
  return info.Env().Undefined();
}

Napi::Value Cast(const Napi::CallbackInfo& info) {
  Args a{info, "cast"};
  ops::cast(a.tensor(0, "dst"), a.tensor(1, "src"));
  return info.Env().Undefined();
}

Napi::Value SetVariantKernels(const Napi::CallbackInfo& info) {
  Args a{info, "setVariantKernels"};
  ops::set_variant_kernels(a.boolean(0, "enabled"));
  return info.Env().Undefined();
}

Napi::Value SetDecodePipeline(const Napi::CallbackInfo& info) {
  Args a{info, "setDecodePipeline"};
  ops::set_decode_pipeline(a.string(0, "pipeline"));
  return info.Env().Undefined();
}

Napi::Value SetAttentionSplitSize(const Napi::CallbackInfo& info) {
  Args a{info, "setAttentionSplitSize"};
  ops::set_attention_split_size(a.integer(0, "keys"));
  return info.Env().Undefined();
}

Napi::Value AttentionSplitSize(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), ops::attention_split_size_now());
}

Napi::Value SetPrefillKernel(const Napi::CallbackInfo& info) {
  Args a{info, "setPrefillKernel"};
  ops::set_prefill_kernel(a.string(0, "kernel"));
  return info.Env().Undefined();
}

Napi::Value SetMatmulKernels(const Napi::CallbackInfo& info) {
  Args a{info, "setMatmulKernels"};
  ops::set_matmul_kernels(a.string(0, "kernels"));
  return info.Env().Undefined();
}

Napi::Value VariantKernels(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), variant_kernels());
}

Napi::Value CudaStatus(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  cuda_runtime::Status s = cuda_runtime::status();
  Napi::Object o = Napi::Object::New(env);
  o.Set("compiled", s.compiled);
  o.Set("available", s.available);
  o.Set("reason", s.reason);
  o.Set("archs", s.archs);
  o.Set("runtimeVersion", s.runtime_version);
  o.Set("driverVersion", s.driver_version);
  Napi::Array devices = Napi::Array::New(env, s.devices.size());
  for (size_t i = 0; i < s.devices.size(); ++i) {
    const auto& d = s.devices[i];
    Napi::Object dev = Napi::Object::New(env);
    dev.Set("index", d.index);
    dev.Set("name", d.name);
    dev.Set("computeCapability", std::to_string(d.major) + "." + std::to_string(d.minor));
    dev.Set("totalMemory", static_cast<double>(d.total_memory));
    dev.Set("multiprocessors", d.multiprocessors);
    devices[i] = dev;
  }
  o.Set("devices", devices);
  o.Set("matmulKernels", s.available ? ops::cuda_matmul_kernels() : "");
  return o;
}

#if defined(DETINFER_STAMPS)
// Development (DETINFER_STAMPS builds): {next, records: [{slot, seq, M, N, K, tile, tiles, chains,
// gateUp, norm}], data: ArrayBuffer of u64 [slots][blocks][events]} of the sm_90 matmul launches'
// per-block stamps (matmul_sm90_kernel.cuh), which it then clears.
Napi::Value Stamps(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::vector<ops::MatmulStampRecord> records;
  std::vector<unsigned long long> data;
  long long next = 0;
  ops::matmul_stamps(records, data, next);
  Napi::Object o = Napi::Object::New(env);
  o.Set("next", static_cast<double>(next));
  Napi::Array rs = Napi::Array::New(env);
  uint32_t n = 0;
  for (size_t i = 0; i < records.size(); ++i) {
    const auto& r = records[i];
    if (r.seq < 0) continue;
    Napi::Object x = Napi::Object::New(env);
    x.Set("slot", static_cast<double>(i));
    x.Set("seq", static_cast<double>(r.seq));
    x.Set("M", r.M);
    x.Set("N", r.N);
    x.Set("K", r.K);
    x.Set("tile", std::to_string(r.bm) + "x" + std::to_string(r.bn) + " s" + std::to_string(r.stages) + " a" +
                      std::to_string(r.a_rows) + " kt" + std::to_string(r.kt));
    x.Set("tiles", r.tiles);
    x.Set("chains", r.chains);
    x.Set("gateUp", r.gate_up);
    x.Set("norm", r.norm);
    rs[n++] = x;
  }
  o.Set("records", rs);
  auto buf = Napi::ArrayBuffer::New(env, data.size() * sizeof(unsigned long long));
  std::memcpy(buf.Data(), data.data(), buf.ByteLength());
  o.Set("data", buf);
  return o;
}
#endif

}  // namespace

void RegisterOps(Napi::Env env, Napi::Object exports) {
  struct Entry {
    const char* name;
    Napi::Value (*fn)(const Napi::CallbackInfo&);
  };
  const Entry entries[] = {
      {"empty", Empty},         {"fromBuffer", FromBuffer},
      {"upload", Upload},       {"download", Download},
      {"synchronize", Synchronize}, {"view", View},
      {"narrow", Narrow},       {"embedding", Embedding},
      {"rmsnorm", Rmsnorm},     {"addRmsnorm", AddRmsnorm},
      {"matmul", Matmul},       {"rope", Rope},
      {"matmulPartitioned", MatmulPartitioned}, {"matmulPartials", MatmulPartials},
      {"combinePartials", CombinePartials},
      {"siluMul", SiluMul},     {"add", Add},
      {"kvAppend", KvAppend},   {"attention", Attention},
      {"siluMulPacked", SiluMulPacked}, {"qkvRopeAppend", QkvRopeAppend},
      {"matmulSiluMul", MatmulSiluMul}, {"normMatmul", NormMatmul},
      {"normMatmulSiluMul", NormMatmulSiluMul},
      {"logSoftmax", LogSoftmax}, {"argmax", Argmax},
      {"tokenLogprobs", TokenLogprobs}, {"chooseTokens", ChooseTokens},
      {"applyLogitProcessors", ApplyLogitProcessors}, {"recordLogitChoices", RecordLogitChoices},
      {"resetLogitRow", ResetLogitRow},
      {"copy", Copy},
      {"uploadAsync", UploadAsync}, {"graphBegin", GraphBegin},
      {"graphEnd", GraphEnd},   {"graphAbort", GraphAbort},
      {"memoryInfo", MemoryInfo},
      {"cast", Cast},           {"setVariantKernels", SetVariantKernels},
      {"setDecodePipeline", SetDecodePipeline},
      {"setPrefillKernel", SetPrefillKernel},
      {"setAttentionSplitSize", SetAttentionSplitSize}, {"attentionSplitSize", AttentionSplitSize},
      {"setMatmulKernels", SetMatmulKernels},
      {"variantKernels", VariantKernels}, {"cudaStatus", CudaStatus},
  };
  for (const Entry& e : entries) exports.Set(e.name, Napi::Function::New(env, e.fn, e.name));
#if defined(DETINFER_STAMPS)
  exports.Set("stamps", Napi::Function::New(env, Stamps, "stamps"));
#endif
}

}  // namespace detinfer::binding
