#include "cuda/lt_gemm.hpp"

#include <algorithm>
#include <functional>
#include <utility>

#include "cuda/cuda_check.hpp"
#include "tutel/core/logging.hpp"

namespace tutel::cuda {
namespace {

const char* type_name(cudaDataType t) {
  switch (t) {
    case CUDA_R_32F: return "f32";
    case CUDA_R_16BF: return "bf16";
    default: return "?";
  }
}

// Releases a descriptor-like handle when the scope ends unless it was handed on.
template <typename Handle, cublasStatus_t (*Destroy)(Handle)>
struct Owned {
  Handle h = nullptr;
  ~Owned() {
    if (h) (void)Destroy(h);
  }
  Handle release() { return std::exchange(h, nullptr); }
};

const char* status_name(cublasStatus_t st) {
  switch (st) {
    case CUBLAS_STATUS_NOT_SUPPORTED: return "NOT_SUPPORTED";
    case CUBLAS_STATUS_INVALID_VALUE: return "INVALID_VALUE";
    case CUBLAS_STATUS_SUCCESS: return "no algorithm";
    default: return "error";
  }
}

}  // namespace

uint32_t lt_alignment(const void* p, std::initializer_list<int64_t> byte_offsets) {
  uint64_t bits = reinterpret_cast<uintptr_t>(p) | 256u;
  for (int64_t off : byte_offsets) bits |= static_cast<uint64_t>(off < 0 ? -off : off);
  return static_cast<uint32_t>(bits & (~bits + 1));  // lowest set bit; 256 at most
}

// One problem's descriptors and the algorithm the heuristic chose; `usable` false where it
// offered none (then the descriptors are not kept).
struct LtGemm::Plan {
  bool usable = false;
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};

  ~Plan() {
    if (d) (void)cublasLtMatrixLayoutDestroy(d);
    if (b) (void)cublasLtMatrixLayoutDestroy(b);
    if (a) (void)cublasLtMatrixLayoutDestroy(a);
    if (op) (void)cublasLtMatmulDescDestroy(op);
  }
};

size_t LtGemm::ProblemHash::operator()(const LtProblem& p) const {
  size_t h = 0;
  auto mix = [&h](uint64_t v) { h ^= std::hash<uint64_t>{}(v) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2); };
  for (int64_t v : {p.m, p.n, p.k, p.lda, p.ldb, p.ldd, p.stride_a, p.stride_b, p.stride_d, p.batch, p.bias_stride})
    mix(static_cast<uint64_t>(v));
  mix(static_cast<uint64_t>(p.ab_type) << 16 | static_cast<uint64_t>(p.d_type));
  mix(uint64_t{p.trans_a} | uint64_t{p.trans_b} << 1 | uint64_t{p.bias} << 2 | uint64_t{p.relu} << 3);
  mix(uint64_t{p.align_a} | uint64_t{p.align_b} << 16 | uint64_t{p.align_d} << 32 | uint64_t{p.align_bias} << 48);
  return h;
}

LtGemm::LtGemm() = default;

LtGemm::~LtGemm() {
  plans_.clear();
  if (handle_) (void)cublasLtDestroy(handle_);
}

Status LtGemm::init(void* workspace, size_t workspace_bytes) {
  workspace_ = workspace;
  workspace_bytes_ = workspace_bytes;
  TUTEL_CUBLAS_CHECK(cublasLtCreate(&handle_));
  return Status::OK();
}

// Once per kind of problem (data types and epilogue): the step still runs, the epilogue as a
// pass of its own, and the WARN line says which kind cuBLASLt would not fuse.
void LtGemm::warn_refused(const LtProblem& p, const char* why) {
  const uint32_t kind = 1u << ((p.d_type == CUDA_R_16BF) | (p.ab_type == CUDA_R_16BF) << 1 | p.bias << 2 | p.relu << 3);
  if (warned_ & kind) return;
  warned_ |= kind;
  TUTEL_LOG(WARN) << "cuBLASLt offers no algorithm for a " << type_name(p.ab_type) << " -> " << type_name(p.d_type)
                  << " GEMM m=" << p.m << " n=" << p.n << " k=" << p.k << " batch=" << p.batch
                  << (p.bias ? " with an f32 bias" : "") << (p.relu ? " and relu" : "") << " (alignments " << p.align_a
                  << "/" << p.align_b << "/" << p.align_d << "/" << p.align_bias << "; " << why
                  << "); its epilogue runs as a separate kernel";
}

Result<LtGemm::Plan*> LtGemm::plan_for(const LtProblem& p) {
  if (auto it = plans_.find(p); it != plans_.end()) return it->second.get();
  if (plans_.size() >= kMaxPlans) plans_.clear();  // no Plan* outlives the call that got it
  auto plan = std::make_unique<Plan>();
  Owned<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy> op;
  Owned<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy> la, lb, ld;
  Owned<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy> pref;

  TUTEL_CUBLAS_CHECK(cublasLtMatmulDescCreate(&op.h, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const int32_t ta = p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  TUTEL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
  TUTEL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
  const cublasLtEpilogue_t epilogue = p.bias ? (p.relu ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_BIAS)
                                             : (p.relu ? CUBLASLT_EPILOGUE_RELU : CUBLASLT_EPILOGUE_DEFAULT);
  TUTEL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof epilogue));
  if (p.bias) {
    // The bias stays f32 (the layer's parameter) whatever D's type; the default would be D's.
    const int32_t bias_type = CUDA_R_32F;
    TUTEL_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof bias_type));
    TUTEL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, &p.bias_stride,
                                                      sizeof p.bias_stride));
    // The heuristic reads only the pointer's alignment (it never dereferences it): an address
    // with exactly the problem's alignment stands in until run() sets the real one.
    const void* stand_in = reinterpret_cast<const void*>(static_cast<uintptr_t>(p.align_bias));
    TUTEL_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &stand_in, sizeof stand_in));
  }

  // Stored shapes: op(X) is rows × cols, so X itself is cols × rows when transposed.
  auto layout = [&p](cublasLtMatrixLayout_t* out, cudaDataType type, int64_t rows, int64_t cols, int64_t ld,
                     int64_t stride) -> Status {
    TUTEL_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(out, type, static_cast<uint64_t>(rows),
                                                  static_cast<uint64_t>(cols), ld));
    const int32_t batch = static_cast<int32_t>(p.batch);
    TUTEL_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(*out, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch,
                                                        sizeof batch));
    TUTEL_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(*out, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                        &stride, sizeof stride));
    return Status::OK();
  };
  TUTEL_RETURN_IF_ERROR(layout(&la.h, p.ab_type, p.trans_a ? p.k : p.m, p.trans_a ? p.m : p.k, p.lda, p.stride_a));
  TUTEL_RETURN_IF_ERROR(layout(&lb.h, p.ab_type, p.trans_b ? p.n : p.k, p.trans_b ? p.k : p.n, p.ldb, p.stride_b));
  TUTEL_RETURN_IF_ERROR(layout(&ld.h, p.d_type, p.m, p.n, p.ldd, p.stride_d));

  TUTEL_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref.h));
  const uint64_t max_workspace = workspace_bytes_;
  TUTEL_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                          &max_workspace, sizeof max_workspace));
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> alignments[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, p.align_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, p.align_b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, p.align_d},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, p.align_d}};
  for (const auto& [attribute, bytes] : alignments)
    TUTEL_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref.h, attribute, &bytes, sizeof bytes));

  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  const cublasStatus_t st =
      cublasLtMatmulAlgoGetHeuristic(handle_, op.h, la.h, lb.h, ld.h, ld.h, pref.h, 1, &heuristic, &found);
  if (st == CUBLAS_STATUS_SUCCESS && found > 0 && heuristic.state == CUBLAS_STATUS_SUCCESS) {
    plan->usable = true;
    plan->algo = heuristic.algo;
    plan->op = op.release();
    plan->a = la.release();
    plan->b = lb.release();
    plan->d = ld.release();
  } else if (st != CUBLAS_STATUS_SUCCESS && st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE) {
    return cublas_error(st, "cublasLtMatmulAlgoGetHeuristic", __FILE__, __LINE__);
  } else {
    warn_refused(p, st != CUBLAS_STATUS_SUCCESS ? status_name(st) : found == 0 ? "no algorithm" : "algorithm state");
  }
  return plans_.emplace(p, std::move(plan)).first->second.get();
}

Result<bool> LtGemm::supports(const LtProblem& p) {
  TUTEL_ASSIGN_OR_RETURN(Plan * plan, plan_for(p));
  return plan->usable;
}

Result<bool> LtGemm::run(const LtProblem& p, const void* a, const void* b, void* d, const float* bias,
                         cudaStream_t stream) {
  TUTEL_ASSIGN_OR_RETURN(Plan * plan, plan_for(p));
  if (!plan->usable) return false;
  if (p.bias)
    TUTEL_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
  const float alpha = 1.f, beta = 0.f;
  const cublasStatus_t st = cublasLtMatmul(handle_, plan->op, &alpha, a, plan->a, b, plan->b, &beta, d, plan->d, d,
                                           plan->d, &plan->algo, workspace_, workspace_bytes_, stream);
  if (st == CUBLAS_STATUS_NOT_SUPPORTED) {
    // Refused before queueing anything: this problem goes the plain way from now on.
    warn_refused(p, "cublasLtMatmul refused the heuristic's algorithm");
    plan->usable = false;
    return false;
  }
  TUTEL_CUBLAS_CHECK(st);
  return true;
}

}  // namespace tutel::cuda
