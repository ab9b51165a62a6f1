// Integer formulas from the ce_kernels AOT manifest ("max_blocks * cdiv(I, BLOCK_N)", "3*C",
// "T*KM + min(E, T*KM) * (BLOCK_M - 1)"), compiled once to a small stack program and evaluated
// without allocating (the evaluator runs in IPluginV3OneRuntime::enqueue).
//
// Grammar (Python integer semantics, non-negative operands in practice):
//   expr   := term (('+' | '-') term)*
//   term   := unary (('*' | '//' | '%') unary)*
//   unary  := '-' unary | atom
//   atom   := integer | name | name '(' expr (',' expr)* ')' | '(' expr ')'
// Functions: cdiv(a, b), min(a, b, ...), max(a, b, ...). A name is, in this order: a constant
// (a kernel's constexprs), a definition (another formula, expanded inline), or a shape variable.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace ce_trt
{

//! Shape variables a formula may read (the manifest's letters).
enum class Var : uint8_t
{
    kT = 0,  //!< tokens
    kH,      //!< hidden size
    kI,      //!< expert intermediate size
    kC,      //!< ces width (0 for a plain MoE)
    kE,      //!< experts
    kK,      //!< top_k
    kKM,     //!< main experts per token (top_k - n_ce)
    kBLOCK_M, //!< alignment block, for workspace formulas (kernels have it as a constexpr)
    kCount
};

constexpr int kVarCount = static_cast<int>(Var::kCount);

using VarValues = int64_t[kVarCount];

//! Name of a variable as written in formulas ("T", "KM", ...).
char const* varName(Var v);

struct FormulaOp
{
    enum class Code : uint8_t
    {
        kConst,
        kVar,
        kAdd,
        kSub,
        kMul,
        kFloorDiv,
        kMod,
        kNeg,
        kCdiv,
        kMin,
        kMax
    };
    Code code{Code::kConst};
    int64_t value{0}; //!< the constant, the variable index, or the argument count of min/max
};

struct Formula
{
    std::vector<FormulaOp> ops;
    std::string text; //!< as written, for messages

    bool empty() const { return ops.empty(); }
    //! True when the formula reads no shape variable.
    bool isConstant() const;
};

struct FormulaScope
{
    std::map<std::string, int64_t, std::less<>> constants;
    std::map<std::string, std::string, std::less<>> definitions;
};

//! Compiles `text`; on failure returns false with a message in `error`.
bool compileFormula(std::string_view text, FormulaScope const& scope, Formula& out, std::string* error);

enum class EvalStatus : uint8_t
{
    kOk,
    kOverflow,
    kDivisionByZero,
    kMalformed
};

//! Evaluates a compiled formula; never allocates.
EvalStatus evalFormula(Formula const& formula, VarValues const& vars, int64_t& out) noexcept;

char const* evalStatusName(EvalStatus status) noexcept;

} // namespace ce_trt
