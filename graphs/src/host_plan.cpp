// The host plan: the recorded ops replayed in order on the caller's tensors. On the CPU backend
// this is the whole execution; on any backend it is the reference the graph plans must match.
#include <vector>

#include "plan_base.hpp"

namespace tutel::graphs::detail {
namespace {

class HostPlan final : public PlanBase {
 public:
  HostPlan(Backend& backend, const PlanTarget& target, const PlanKey& key)
      : PlanBase(backend, target, key, /*io_buffers=*/false), counts_(target.spec.experts) {}

  Status init() { return PlanBase::init(counts_.data(), &l_aux_); }

  PlanKind kind() const override { return PlanKind::kHost; }

 protected:
  Status run(std::initializer_list<Phase> phases, const StepState& st) override {
    for (Phase p : phases) TUTEL_RETURN_IF_ERROR(run_ops(p, st));
    return Status::OK();
  }
  Status read_to_host(void* host, const void* device, size_t bytes, bool) override {
    return backend_.copy(host, device, bytes, CopyKind::kDeviceToHost);
  }
  // No copies: the ops read x and write y where the caller keeps them.
  Status bind_forward(TensorView x, TensorView y, StepState& st) override {
    st.x = x;
    st.y = y;
    return Status::OK();
  }
  Status finish_forward(TensorView, const StepState&) override { return Status::OK(); }
  Status bind_backward(TensorView x, TensorView dy, TensorView dx, StepState& st) override {
    st.x = x;
    st.dy = dy;
    st.dx = dx;
    return Status::OK();
  }
  Status finish_backward(TensorView, const StepState&) override { return Status::OK(); }

 private:
  std::vector<int32_t> counts_;  // the route phase's read of the expert counts
  float l_aux_ = 0.f;
};

}  // namespace

Result<std::unique_ptr<Plan>> make_host_plan(Backend& backend, const PlanTarget& target,
                                             const PlanKey& key) {
  auto plan = std::make_unique<HostPlan>(backend, target, key);
  TUTEL_RETURN_IF_ERROR(plan->init());
  return std::unique_ptr<Plan>(std::move(plan));
}

}  // namespace tutel::graphs::detail
