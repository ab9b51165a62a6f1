#include "mini_json.h"

#include <cerrno>
#include <cstdlib>

namespace ce_trt::json
{

Value const* Value::find(std::string_view key) const
{
    if (kind != Kind::kObject)
    {
        return nullptr;
    }
    for (auto const& member : object)
    {
        if (member.first == key)
        {
            return &member.second;
        }
    }
    return nullptr;
}

namespace
{

constexpr int kMaxDepth = 64;

class Parser
{
public:
    explicit Parser(std::string_view text)
        : mText(text)
    {
    }

    bool document(Value& out, std::string* error)
    {
        skipSpace();
        if (!value(out, 0))
        {
            return fail(error);
        }
        skipSpace();
        if (mPos != mText.size())
        {
            mMessage = "trailing characters";
            return fail(error);
        }
        return true;
    }

private:
    bool fail(std::string* error) const
    {
        if (error != nullptr)
        {
            *error = "JSON: " + mMessage + " at byte " + std::to_string(mPos);
        }
        return false;
    }

    bool setError(char const* message)
    {
        mMessage = message;
        return false;
    }

    void skipSpace()
    {
        while (mPos < mText.size()
            && (mText[mPos] == ' ' || mText[mPos] == '\n' || mText[mPos] == '\r' || mText[mPos] == '\t'))
        {
            ++mPos;
        }
    }

    bool literal(std::string_view word)
    {
        if (mText.substr(mPos, word.size()) != word)
        {
            return setError("invalid literal");
        }
        mPos += word.size();
        return true;
    }

    bool value(Value& out, int depth)
    {
        if (depth > kMaxDepth)
        {
            return setError("nesting too deep");
        }
        if (mPos >= mText.size())
        {
            return setError("unexpected end");
        }
        char const c = mText[mPos];
        switch (c)
        {
        case '{': return objectValue(out, depth);
        case '[': return arrayValue(out, depth);
        case '"': out.kind = Value::Kind::kString; return stringValue(out.string);
        case 't': out.kind = Value::Kind::kBool; out.boolean = true; return literal("true");
        case 'f': out.kind = Value::Kind::kBool; out.boolean = false; return literal("false");
        case 'n': out.kind = Value::Kind::kNull; return literal("null");
        default: return numberValue(out);
        }
    }

    bool objectValue(Value& out, int depth)
    {
        out.kind = Value::Kind::kObject;
        ++mPos; // '{'
        skipSpace();
        if (mPos < mText.size() && mText[mPos] == '}')
        {
            ++mPos;
            return true;
        }
        while (true)
        {
            skipSpace();
            if (mPos >= mText.size() || mText[mPos] != '"')
            {
                return setError("expected a member name");
            }
            std::string key;
            if (!stringValue(key))
            {
                return false;
            }
            skipSpace();
            if (mPos >= mText.size() || mText[mPos] != ':')
            {
                return setError("expected ':'");
            }
            ++mPos;
            skipSpace();
            out.object.emplace_back(std::move(key), Value{});
            if (!value(out.object.back().second, depth + 1))
            {
                return false;
            }
            skipSpace();
            if (mPos < mText.size() && mText[mPos] == ',')
            {
                ++mPos;
                continue;
            }
            if (mPos < mText.size() && mText[mPos] == '}')
            {
                ++mPos;
                return true;
            }
            return setError("expected ',' or '}'");
        }
    }

    bool arrayValue(Value& out, int depth)
    {
        out.kind = Value::Kind::kArray;
        ++mPos; // '['
        skipSpace();
        if (mPos < mText.size() && mText[mPos] == ']')
        {
            ++mPos;
            return true;
        }
        while (true)
        {
            skipSpace();
            out.array.emplace_back();
            if (!value(out.array.back(), depth + 1))
            {
                return false;
            }
            skipSpace();
            if (mPos < mText.size() && mText[mPos] == ',')
            {
                ++mPos;
                continue;
            }
            if (mPos < mText.size() && mText[mPos] == ']')
            {
                ++mPos;
                return true;
            }
            return setError("expected ',' or ']'");
        }
    }

    static void appendUtf8(std::string& out, uint32_t code)
    {
        if (code < 0x80)
        {
            out += static_cast<char>(code);
        }
        else if (code < 0x800)
        {
            out += static_cast<char>(0xC0 | (code >> 6));
            out += static_cast<char>(0x80 | (code & 0x3F));
        }
        else if (code < 0x10000)
        {
            out += static_cast<char>(0xE0 | (code >> 12));
            out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (code & 0x3F));
        }
        else
        {
            out += static_cast<char>(0xF0 | (code >> 18));
            out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
            out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (code & 0x3F));
        }
    }

    bool hex4(uint32_t& code)
    {
        if (mPos + 4 > mText.size())
        {
            return setError("short \\u escape");
        }
        code = 0;
        for (int i = 0; i < 4; ++i)
        {
            char const h = mText[mPos++];
            code <<= 4;
            if (h >= '0' && h <= '9')
            {
                code |= static_cast<uint32_t>(h - '0');
            }
            else if (h >= 'a' && h <= 'f')
            {
                code |= static_cast<uint32_t>(h - 'a' + 10);
            }
            else if (h >= 'A' && h <= 'F')
            {
                code |= static_cast<uint32_t>(h - 'A' + 10);
            }
            else
            {
                return setError("bad \\u escape");
            }
        }
        return true;
    }

    bool stringValue(std::string& out)
    {
        ++mPos; // opening quote
        while (mPos < mText.size())
        {
            char const c = mText[mPos++];
            if (c == '"')
            {
                return true;
            }
            if (static_cast<unsigned char>(c) < 0x20)
            {
                return setError("control character in string");
            }
            if (c != '\\')
            {
                out += c;
                continue;
            }
            if (mPos >= mText.size())
            {
                break;
            }
            char const e = mText[mPos++];
            switch (e)
            {
            case '"': out += '"'; break;
            case '\\': out += '\\'; break;
            case '/': out += '/'; break;
            case 'b': out += '\b'; break;
            case 'f': out += '\f'; break;
            case 'n': out += '\n'; break;
            case 'r': out += '\r'; break;
            case 't': out += '\t'; break;
            case 'u':
            {
                uint32_t code = 0;
                if (!hex4(code))
                {
                    return false;
                }
                if (code >= 0xD800 && code < 0xDC00 && mText.substr(mPos, 2) == "\\u")
                {
                    mPos += 2;
                    uint32_t low = 0;
                    if (!hex4(low))
                    {
                        return false;
                    }
                    code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                }
                appendUtf8(out, code);
                break;
            }
            default: return setError("bad escape");
            }
        }
        return setError("unterminated string");
    }

    bool numberValue(Value& out)
    {
        size_t const start = mPos;
        bool isFloat = false;
        if (mPos < mText.size() && mText[mPos] == '-')
        {
            ++mPos;
        }
        size_t const digits = mPos;
        while (mPos < mText.size())
        {
            char const c = mText[mPos];
            if (c >= '0' && c <= '9')
            {
                ++mPos;
            }
            else if (c == '.' || c == 'e' || c == 'E' || ((c == '+' || c == '-') && mPos > digits))
            {
                isFloat = true;
                ++mPos;
            }
            else
            {
                break;
            }
        }
        if (mPos == digits)
        {
            return setError("unexpected character");
        }
        std::string const token(mText.substr(start, mPos - start));
        char* end = nullptr;
        errno = 0;
        if (isFloat)
        {
            out.kind = Value::Kind::kFloat;
            out.number = std::strtod(token.c_str(), &end);
        }
        else
        {
            out.kind = Value::Kind::kInt;
            out.integer = std::strtoll(token.c_str(), &end, 10);
            out.number = static_cast<double>(out.integer);
        }
        if (errno != 0 || end != token.c_str() + token.size())
        {
            return setError("bad number");
        }
        return true;
    }

    std::string_view mText;
    size_t mPos{0};
    std::string mMessage;
};

} // namespace

bool parse(std::string_view text, Value& out, std::string* error)
{
    out = Value{};
    Parser parser(text);
    return parser.document(out, error);
}

} // namespace ce_trt::json
