#pragma once
// The stage concept: what the executor needs from the user's model. Duck-typed: any type with
// these members works, no base class, no virtual functions. T is the stage's value_type.
//
//   using value_type = float;                           // element type of every buffer below
//   std::size_t input_size(int chunk) const;            // elements of the chunk's input activation
//   std::size_t output_size(int chunk) const;           // elements of its output activation
//   std::size_t activation_size(int chunk) const;       // elements it saves for its backward
//   void forward(const pass_info&, std::span<const T> input, std::span<T> output,
//                std::span<T> saved);
//   // the combined backward ...
//   void backward(const pass_info&, std::span<const T> input, std::span<T> saved,
//                 std::span<const T> output_grad, std::span<T> input_grad);
//   // ... and/or the zero-bubble split (B, then W some time later)
//   void backward_input(const pass_info&, std::span<const T> input, std::span<T> saved,
//                       std::span<const T> output_grad, std::span<T> input_grad);
//   void backward_weight(const pass_info&, std::span<const T> input, std::span<const T> saved,
//                        std::span<const T> output_grad);
//   // optional
//   void load_input(const pass_info&, std::span<T> input);  // first virtual stage: the data
//   auto gradients();                       // a range of std::span<T>: the data-parallel reduce
//
// `chunk` is local to the rank (0 .. chunks - 1); pass_info also names the virtual stage. The
// executor owns every buffer: `saved` is the stage's per-(chunk, microbatch) scratch that lives
// from the forward to the last backward pass of that microbatch (the stage decides what goes in
// it: layer inputs, pre-activations, and, written by backward_input, the intermediate gradients
// backward_weight needs); `input` and `output_grad` also stay alive until then. On the first
// virtual stage input_grad is empty (nobody consumes it); on the last, output_grad is empty (the
// stage computes the loss gradient itself). Weight gradients accumulate inside the stage over
// the microbatches of a step; the stage zeroes them itself between steps.

#include <concepts>
#include <cstddef>
#include <ranges>
#include <span>
#include <type_traits>

#include "pipit/runtime/pass_info.hpp"

namespace pipit::runtime {

template <class S>
concept stage_has_value_type = requires {
  typename S::value_type;
}
&&std::is_trivially_copyable_v<typename S::value_type>;

template <class S>
concept stage_has_sizes = requires(const S& s, int chunk) {
  { s.input_size(chunk) } -> std::convertible_to<std::size_t>;
  { s.output_size(chunk) } -> std::convertible_to<std::size_t>;
  { s.activation_size(chunk) } -> std::convertible_to<std::size_t>;
};

template <class S, class T = typename S::value_type>
concept stage_has_forward = requires(S& s, const pass_info& i, std::span<const T> in,
                                     std::span<T> out) {
  s.forward(i, in, out, out);
};

template <class S, class T = typename S::value_type>
concept stage_has_backward = requires(S& s, const pass_info& i, std::span<const T> in,
                                      std::span<T> out) {
  s.backward(i, in, out, in, out);
};

template <class S, class T = typename S::value_type>
concept stage_has_backward_input = requires(S& s, const pass_info& i, std::span<const T> in,
                                            std::span<T> out) {
  s.backward_input(i, in, out, in, out);
};

template <class S, class T = typename S::value_type>
concept stage_has_backward_weight = requires(S& s, const pass_info& i, std::span<const T> in) {
  s.backward_weight(i, in, in, in);
};

template <class S, class T = typename S::value_type>
concept stage_has_load_input = requires(S& s, const pass_info& i, std::span<T> in) {
  s.load_input(i, in);
};

template <class S, class T = typename S::value_type>
concept stage_has_gradients = requires(S& s) {
  { s.gradients() } -> std::ranges::range;
  { *std::ranges::begin(s.gradients()) } -> std::convertible_to<std::span<T>>;
};

// Runs the zero-bubble split: B and W as two passes.
template <class S>
concept split_backward_stage =
    stage_has_value_type<S> && stage_has_backward_input<S> && stage_has_backward_weight<S>;

// Everything the executor needs: sizes, forward, and a backward (combined or split).
template <class S>
concept stage = stage_has_value_type<S> && stage_has_sizes<S> && stage_has_forward<S> &&
    (stage_has_backward<S> || split_backward_stage<S>);

// Checks the stage's members one by one, so that a missing one is named by its static_assert
// (a failed concept alone prints only the whole conjunction). Always returns true.
template <class S>
consteval bool check_stage() {
  static_assert(stage_has_value_type<S>,
                "pipit::runtime: the stage lacks `using value_type = ...;` (the trivially "
                "copyable element type of its activation buffers, e.g. float or double)");
  if constexpr (stage_has_value_type<S>) {
    static_assert(stage_has_sizes<S>,
                  "pipit::runtime: the stage lacks `std::size_t input_size(int chunk) const`, "
                  "`output_size(int chunk) const` or `activation_size(int chunk) const`");
    static_assert(stage_has_forward<S>,
                  "pipit::runtime: the stage lacks `void forward(const pass_info&, "
                  "std::span<const T> input, std::span<T> output, std::span<T> saved)`");
    static_assert(!stage_has_backward_input<S> || stage_has_backward_weight<S>,
                  "pipit::runtime: the stage has backward_input but lacks `void "
                  "backward_weight(const pass_info&, std::span<const T> input, "
                  "std::span<const T> saved, std::span<const T> output_grad)`");
    static_assert(!stage_has_backward_weight<S> || stage_has_backward_input<S>,
                  "pipit::runtime: the stage has backward_weight but lacks `void "
                  "backward_input(const pass_info&, std::span<const T> input, std::span<T> "
                  "saved, std::span<const T> output_grad, std::span<T> input_grad)`");
    static_assert(
        stage_has_backward<S> || stage_has_backward_input<S> || stage_has_backward_weight<S>,
        "pipit::runtime: the stage lacks a backward: `void backward(const pass_info&, "
        "std::span<const T> input, std::span<T> saved, std::span<const T> output_grad, "
        "std::span<T> input_grad)` or backward_input and backward_weight");
  }
  return true;
}

}  // namespace pipit::runtime
