#pragma once
// run_stage_pass: one compiled instruction's call into the user's stage — forward (with
// load_input on the first virtual stage), B, W or BW, re-running the forward first when the
// instruction asks for re-materialization. Shared by runtime::executor (host arena) and
// cuda::device_executor (device arena): the buffers are spans into `arena`, wherever it lives.

#include <span>
#include <utility>

#include "pipit/runtime/pass_info.hpp"
#include "pipit/runtime/program.hpp"
#include "pipit/runtime/stage.hpp"

namespace pipit::runtime {

// Returns false when `in` is not a stage pass (an exchange or a vocabulary pass).
// load_input: whether the first virtual stage loads its input (false when the vocabulary layers
// write it).
template <class Stage, class T>
bool run_stage_pass(Stage& st, const instruction& in, const pass_info& info, T* arena,
                    bool load_input) {
  const auto buf = [arena](const buffer_ref& r) { return std::span<T>(arena + r.offset, r.size); };
  const auto cbuf = [arena](const buffer_ref& r) {
    return std::span<const T>(arena + r.offset, r.size);
  };
  const auto recompute = [&] {
    pass_info again = info;
    again.recompute = true;
    st.forward(std::as_const(again), cbuf(in.input), buf(in.output), buf(in.saved));
  };
  switch (in.kind) {
    case instruction_kind::forward:
      if constexpr (stage_has_load_input<Stage>)
        if (in.first && load_input) st.load_input(info, buf(in.input));
      st.forward(info, cbuf(in.input), buf(in.output), buf(in.saved));
      return true;
    case instruction_kind::backward_input:
      if (in.recompute) recompute();
      if constexpr (split_backward_stage<Stage>)
        st.backward_input(info, cbuf(in.input), buf(in.saved), cbuf(in.output_grad),
                          buf(in.input_grad));
      return true;
    case instruction_kind::backward_weight:
      if constexpr (split_backward_stage<Stage>)
        st.backward_weight(info, cbuf(in.input), cbuf(in.saved), cbuf(in.output_grad));
      return true;
    case instruction_kind::backward:
      if (in.recompute) recompute();
      if constexpr (stage_has_backward<Stage>) {
        st.backward(info, cbuf(in.input), buf(in.saved), cbuf(in.output_grad), buf(in.input_grad));
      } else {
        st.backward_input(info, cbuf(in.input), buf(in.saved), cbuf(in.output_grad),
                          buf(in.input_grad));
        st.backward_weight(info, cbuf(in.input), cbuf(in.saved), cbuf(in.output_grad));
      }
      return true;
    default:
      return false;
  }
}

}  // namespace pipit::runtime
